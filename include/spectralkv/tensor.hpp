#pragma once
// A non-owning view of a dense row-major tensor of rank 3: the shape every K, V, Q and output
// argument of the host API has, [tokens][heads][head_dim], with the last index contiguous.

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "spectralkv/error.hpp"

namespace spectralkv {

template <class T>
struct TensorView {
  T* data = nullptr;
  std::int64_t tokens = 0;    ///< extent of dimension 0
  std::int64_t heads = 0;     ///< extent of dimension 1
  std::int64_t head_dim = 0;  ///< extent of dimension 2 (contiguous)

  T* token(std::int64_t t) const { return data + t * heads * head_dim; }
  T* at(std::int64_t t, std::int64_t h) const { return data + (t * heads + h) * head_dim; }
  std::int64_t size() const { return tokens * heads * head_dim; }
  std::string shape() const { return detail::concat("[", tokens, ", ", heads, ", ", head_dim, "]"); }

  template <class U = T, std::enable_if_t<!std::is_const_v<U>, int> = 0>
  operator TensorView<const U>() const {  // NOLINT: a mutable view is usable wherever a const one is
    return {data, tokens, heads, head_dim};
  }
};

namespace detail {
/// Throws ShapeError unless `view` is [tokens][heads][head_dim] with a non-null pointer when non-empty.
template <class T>
void require_shape(const char* what, const char* name, const TensorView<T>& view, std::int64_t tokens,
                   std::int64_t heads, std::int64_t head_dim) {
  if (view.tokens != tokens || view.heads != heads || view.head_dim != head_dim) {
    fail<ShapeError>(what, name, view.shape(),
                     concat("expected shape [", tokens, ", ", heads, ", ", head_dim, "]"));
  }
  // Every extent is non-negative here (each equals an expected one); the byte count must not wrap.
  constexpr std::int64_t kMaxElems = std::numeric_limits<std::int64_t>::max() / static_cast<std::int64_t>(sizeof(T));
  if (view.heads > 0 && view.head_dim > 0 && view.tokens > kMaxElems / view.heads / view.head_dim)
    fail<ShapeError>(what, name, view.shape(), "more bytes than a 64-bit size can count");
  if (view.size() > 0 && view.data == nullptr) fail<ShapeError>(what, name, "nullptr", "data pointer is null");
}
}  // namespace detail

}  // namespace spectralkv
