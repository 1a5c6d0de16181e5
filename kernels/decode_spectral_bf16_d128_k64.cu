// Explicit instantiations of the fused decode-attention kernel: BF16 queries and dense tiers,
// head_dim 128, rank_k 64, every supported rank_v. One file per (type, head_dim, rank_k) so
// the instantiations compile in parallel.

#include "decode_attention_kernel.cuh"

namespace spectralkv::cuda::kernel {

template void launch_decode<__nv_bfloat16, 128, 64, 8>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__nv_bfloat16, 128, 64, 16>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__nv_bfloat16, 128, 64, 32>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__nv_bfloat16, 128, 64, 64>(const KernelArgs&, int, int, cudaStream_t);

}  // namespace spectralkv::cuda::kernel
