#pragma once
// Host-side 16-bit storage types. They carry the same bits as CUDA's __half and __nv_bfloat16, so a
// buffer of either can be handed to the CUDA backend (or uploaded) without conversion. The CPU
// reference does all arithmetic in FP32 or wider; these types only store.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace spectralkv {

namespace detail {
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace detail

/// IEEE 754 binary16, round-to-nearest-even on conversion (as __float2half_rn).
struct Half {
  std::uint16_t bits = 0;

  Half() = default;
  explicit Half(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t from_float(float f) {
    const std::uint32_t x = detail::float_bits(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // Inf or NaN; keep NaN quiet and non-zero.
      return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to Inf
    if (abs < 0x38800000u) {  // result is subnormal or zero: scale by 2^24 and round the integer
      const float scaled = detail::bits_float(abs) * 16777216.0f;  // exact: power-of-two scaling
      const auto q = static_cast<std::uint32_t>(std::nearbyint(scaled));  // default mode: RNE
      return static_cast<std::uint16_t>(sign | q);
    }
    // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
    std::uint32_t m = abs - 0x38000000u;
    m += 0xfffu + ((m >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (m >> 13));
  }

  static float to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
      const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
      return sign ? -v : v;
    }
    if (exp == 0x1f) return detail::bits_float(sign | 0x7f800000u | (man << 13));
    return detail::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  }
};

/// bfloat16 (the top half of a binary32), round-to-nearest-even on conversion.
struct BFloat16 {
  std::uint16_t bits = 0;

  BFloat16() = default;
  explicit BFloat16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t from_float(float f) {
    const std::uint32_t x = detail::float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
    return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
  static float to_float(std::uint16_t b) { return detail::bits_float(static_cast<std::uint32_t>(b) << 16); }
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types must be 2 bytes");

/// The storage element types the cache accepts.
template <class T>
inline constexpr bool kIsStorageType =
    std::is_same_v<T, float> || std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;

template <class T>
inline float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}

template <class T>
inline T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);
  }
}

/// Name used in error messages and test names.
template <class T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, Half>) return "half";
  if constexpr (std::is_same_v<T, BFloat16>) return "bfloat16";
  return "unknown";
}

}  // namespace spectralkv
