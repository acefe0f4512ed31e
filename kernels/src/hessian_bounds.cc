#include "nvfp4cal/kernels/hessian_bounds.h"

#include <cmath>

namespace nvfp4cal {
namespace {

constexpr int kN = kBlockSize;
// Pivots below this fraction of the largest diagonal mean S is (numerically) singular.
constexpr double kMinRelativePivot = 1e-9;

float RoundDown(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, 0.0f);
  return f;
}

float RoundUp(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, INFINITY);
  return f;
}

}  // namespace

HessianBlockBounds ComputeHessianBlockBounds(const float* h) {
  HessianBlockBounds bounds{};
  double row_sum[kN] = {};
  double col_sum[kN] = {};
  double s[kN][kN];
  double max_diagonal = 0.0;
  for (int a = 0; a < kN; ++a) {
    for (int b = 0; b < kN; ++b) {
      row_sum[a] += std::fabs(static_cast<double>(h[a * kN + b]));
      col_sum[b] += std::fabs(static_cast<double>(h[a * kN + b]));
      s[a][b] = 0.5 * (static_cast<double>(h[a * kN + b]) + static_cast<double>(h[b * kN + a]));
    }
    max_diagonal = std::fmax(max_diagonal, s[a][a]);
  }
  double norm = 0.0;
  for (int a = 0; a < kN; ++a) norm = std::fmax(norm, std::fmax(row_sum[a], col_sum[a]));
  bounds.abs_norm = RoundUp(norm * (1.0 + 1e-12));
  if (!(max_diagonal > 0.0)) return bounds;

  // Cholesky S = L L^T.
  double l[kN][kN] = {};
  for (int j = 0; j < kN; ++j) {
    double d = s[j][j];
    for (int k = 0; k < j; ++k) d -= l[j][k] * l[j][k];
    if (!(d > kMinRelativePivot * max_diagonal)) return bounds;  // precision stays 0
    l[j][j] = std::sqrt(d);
    for (int i = j + 1; i < kN; ++i) {
      double v = s[i][j];
      for (int k = 0; k < j; ++k) v -= l[i][k] * l[j][k];
      l[i][j] = v / l[j][j];
    }
  }
  // (S^-1)_mm = sum_k (L^-1)_km^2; columns of L^-1 by forward substitution.
  for (int m = 0; m < kN; ++m) {
    double x[kN] = {};
    for (int i = m; i < kN; ++i) {
      double v = i == m ? 1.0 : 0.0;
      for (int k = m; k < i; ++k) v -= l[i][k] * x[k];
      x[i] = v / l[i][i];
    }
    double inverse_diagonal = 0.0;
    for (int i = m; i < kN; ++i) inverse_diagonal += x[i] * x[i];
    // Relative error of the double computation is far below this margin for the accepted
    // condition numbers (pivots >= 1e-9 of the diagonal).
    bounds.precision[m] = RoundDown((1.0 / inverse_diagonal) * (1.0 - 1e-6));
  }
  return bounds;
}

std::vector<HessianBlockBounds> ComputeHessianBlockBounds(const BlockHessiansView& hessians) {
  std::vector<HessianBlockBounds> out;
  if (hessians.data == nullptr) return out;
  out.reserve(static_cast<size_t>(hessians.num_blocks));
  for (int64_t j = 0; j < hessians.num_blocks; ++j) {
    out.push_back(ComputeHessianBlockBounds(hessians.data + j * kN * kN));
  }
  return out;
}

HessianBlockBounds IdentityBounds() {
  HessianBlockBounds bounds{};
  for (float& p : bounds.precision) p = RoundDown(1.0 - 1e-6);
  bounds.abs_norm = 1.0f;
  return bounds;
}

}  // namespace nvfp4cal
