#pragma once
// The one error model of the host API. Every throw names the offending argument and its value, and
// every public mutating call validates before it changes anything, so a caught exception leaves the
// cache exactly as it was (strong guarantee).

#include <sstream>
#include <stdexcept>
#include <string>

namespace spectralkv {

/// Base of every exception the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument is out of its documented range (sizes, ranks, layer index, ...).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A tensor's shape does not match what the call requires.
class ShapeError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// K, V or Q holds NaN or Inf: such a value would poison every later attention over the block.
class NonFiniteError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// A sequence id that the cache does not hold (or already holds, when adding).
class SequenceError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// A fixed capacity (block pool, sequence slots) would be exceeded. Raised before any change.
class CapacityError : public Error {
 public:
  using Error::Error;
};

/// A CUDA runtime, cuBLAS or cuSOLVER call failed.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

/// Throws `E` with the message "`what`: argument `name` = `value` (`why`)". `why`: anything streamable (a
/// literal is not copied into a string unless the check fails).
template <class E = InvalidArgument, class V, class W>
[[noreturn]] void fail(const char* what, const char* name, const V& value, const W& why) {
  throw E(concat(what, ": argument ", name, " = ", value, " (", why, ")"));
}

/// Checks on a hot path build no message unless they fail: pass literals, or test with `if` and build
/// the message in the failing branch.
template <class E = InvalidArgument, class V, class W>
void require(bool ok, const char* what, const char* name, const V& value, const W& why) {
  if (!ok) fail<E>(what, name, value, why);
}

}  // namespace detail
}  // namespace spectralkv
