#pragma once
// Fidelity metrics of an approximation against a reference (attention outputs or logits): relative L2
// error, cosine similarity, and the Pearson correlation of the entries (on scores, the score correlation).

#include <cmath>
#include <cstddef>
#include <vector>

#include "spectralkv/error.hpp"

namespace spectralkv {

struct Fidelity {
  double relative_l2 = 0.0;  ///< ‖a − r‖₂ / ‖r‖₂
  double cosine = 0.0;       ///< a·r / (‖a‖ ‖r‖)
  double pearson = 0.0;      ///< correlation of the entries of a and r
};

/// \param reference, approx  the same number of entries, in the same order
inline Fidelity fidelity(const std::vector<float>& reference, const std::vector<float>& approx) {
  detail::require(reference.size() == approx.size(), "fidelity", "approx.size()", approx.size(),
                  detail::concat("must equal reference.size() = ", reference.size()));
  detail::require(!reference.empty(), "fidelity", "reference.size()", 0, "must be non-empty");
  const double n = static_cast<double>(reference.size());
  double mr = 0, ma = 0;
  for (std::size_t i = 0; i < reference.size(); ++i) {
    mr += reference[i];
    ma += approx[i];
  }
  mr /= n;
  ma /= n;
  double err = 0, rr = 0, aa = 0, ar = 0, crr = 0, caa = 0, car = 0;
  for (std::size_t i = 0; i < reference.size(); ++i) {
    const double r = reference[i], a = approx[i];
    err += (a - r) * (a - r);
    rr += r * r;
    aa += a * a;
    ar += a * r;
    crr += (r - mr) * (r - mr);
    caa += (a - ma) * (a - ma);
    car += (a - ma) * (r - mr);
  }
  Fidelity f;
  f.relative_l2 = rr > 0 ? std::sqrt(err / rr) : std::sqrt(err);
  f.cosine = (rr > 0 && aa > 0) ? ar / std::sqrt(rr * aa) : (rr == aa ? 1.0 : 0.0);
  f.pearson = (crr > 0 && caa > 0) ? car / std::sqrt(crr * caa) : (crr == caa ? 1.0 : 0.0);
  return f;
}

}  // namespace spectralkv
