#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "spectralkv/numeric.hpp"

namespace spectralkv {
namespace {

TEST(Half, RoundTripsEveryFiniteValue) {
  // Every finite binary16 value converts to float exactly and back to the same bits.
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    if ((bits & 0x7c00u) == 0x7c00u) continue;  // Inf / NaN
    EXPECT_EQ(Half::from_float(Half::to_float(bits)), bits) << "bits " << b;
  }
}

TEST(Half, RoundsToNearestEven) {
  EXPECT_EQ(static_cast<float>(Half(1.0f + 1.0f / 2048)), 1.0f);                 // tie -> even (1.0)
  EXPECT_EQ(static_cast<float>(Half(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);   // tie -> even (1+2^-9)
  EXPECT_EQ(static_cast<float>(Half(1.0f + 1.1f / 2048)), 1.0f + 1.0f / 1024);   // above the tie
  EXPECT_EQ(static_cast<float>(Half(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(static_cast<float>(Half(65520.0f))));                   // tie at max -> Inf
  EXPECT_EQ(static_cast<float>(Half(65519.0f)), 65504.0f);
  EXPECT_EQ(static_cast<float>(Half(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(static_cast<float>(Half(std::ldexp(1.0f, -25))), 0.0f);                   // tie -> even (0)
  EXPECT_EQ(static_cast<float>(Half(std::ldexp(3.0f, -26))), std::ldexp(1.0f, -24));  // above the tie
  EXPECT_EQ(static_cast<float>(Half(-2.5f)), -2.5f);
  EXPECT_TRUE(std::isnan(static_cast<float>(Half(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(BFloat16, RoundsToNearestEvenAndKeepsNaN) {
  EXPECT_EQ(static_cast<float>(BFloat16(1.0f + 1.0f / 256)), 1.0f);              // tie -> even
  EXPECT_EQ(static_cast<float>(BFloat16(1.0f + 3.0f / 256)), 1.0f + 1.0f / 64);  // tie -> even (up)
  EXPECT_EQ(static_cast<float>(BFloat16(3.0f)), 3.0f);
  EXPECT_TRUE(std::isnan(static_cast<float>(BFloat16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(static_cast<float>(BFloat16(std::numeric_limits<float>::infinity()))));
  for (std::uint32_t b = 0; b < 0x10000u; b += 7) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float f = BFloat16::to_float(bits);
    if (std::isnan(f)) continue;
    EXPECT_EQ(BFloat16::from_float(f), bits);
  }
}

TEST(Half, InfinitiesAndOverflowKeepTheirSign) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Half(inf).bits, 0x7C00u);
  EXPECT_EQ(Half(-inf).bits, 0xFC00u);
  EXPECT_EQ(Half(-65520.0f).bits, 0xFC00u);  // the tie above the largest finite value rounds to -Inf
  EXPECT_EQ(Half(1e10f).bits, 0x7C00u);
  EXPECT_EQ(Half(-0.0f).bits, 0x8000u);
}

TEST(BFloat16, RoundingPastTheLargestFiniteValueGivesInfinity) {
  const float largest = std::numeric_limits<float>::max();  // 0x7F7FFFFF: rounds up past 0x7F7F
  EXPECT_EQ(BFloat16(largest).bits, 0x7F80u);
  EXPECT_EQ(BFloat16(-largest).bits, 0xFF80u);
  EXPECT_EQ(BFloat16(BFloat16::to_float(0x7F7Fu)).bits, 0x7F7Fu);  // the largest finite BF16 stays finite
  EXPECT_EQ(BFloat16(-std::numeric_limits<float>::infinity()).bits, 0xFF80u);
}

}  // namespace
}  // namespace spectralkv
