// Explicit instantiations of the decode-attention kernel over dense tiers only (rank 0): the dense
// baseline and the attention half of DecompressThenAttend.

#include "decode_attention_kernel.cuh"

namespace spectralkv::cuda::kernel {

template void launch_decode<__half, 64, 0, 0>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__half, 128, 0, 0>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__nv_bfloat16, 64, 0, 0>(const KernelArgs&, int, int, cudaStream_t);
template void launch_decode<__nv_bfloat16, 128, 0, 0>(const KernelArgs&, int, int, cudaStream_t);

}  // namespace spectralkv::cuda::kernel
