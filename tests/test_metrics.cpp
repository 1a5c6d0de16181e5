#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "spectralkv/metrics.hpp"

namespace spectralkv {
namespace {

TEST(Fidelity, KnownValues) {
  const std::vector<float> r{1, 2, 3, 4};
  const Fidelity same = fidelity(r, r);
  EXPECT_DOUBLE_EQ(same.relative_l2, 0.0);
  EXPECT_NEAR(same.cosine, 1.0, 1e-15);
  EXPECT_NEAR(same.pearson, 1.0, 1e-15);

  // a = 2r + 1: correlation 1, cosine < 1, ‖a − r‖ = ‖r + 1‖.
  const std::vector<float> a{3, 5, 7, 9};
  const Fidelity affine = fidelity(r, a);
  EXPECT_NEAR(affine.pearson, 1.0, 1e-12);
  EXPECT_NEAR(affine.relative_l2, std::sqrt((4.0 + 9 + 16 + 25) / 30.0), 1e-12);
  EXPECT_NEAR(affine.cosine, (3 + 10 + 21 + 36) / std::sqrt(30.0 * (9 + 25 + 49 + 81)), 1e-12);

  const Fidelity reversed = fidelity(r, {4, 3, 2, 1});
  EXPECT_NEAR(reversed.pearson, -1.0, 1e-12);
}

TEST(Fidelity, RejectsMismatchedSizes) {
  EXPECT_THROW(fidelity({1, 2}, {1, 2, 3}), InvalidArgument);
  EXPECT_THROW(fidelity({}, {}), InvalidArgument);
}

}  // namespace
}  // namespace spectralkv
