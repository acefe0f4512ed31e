#include "nvfp4cal/kernels/internal/hessian_bounds.h"

#include <algorithm>
#include <cmath>
#include <utility>

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

// Cholesky a = L L^T in double (lower triangle of l; l must be zero-initialised). False when a
// pivot is not above min_pivot.
bool Cholesky(const double (&a)[kN][kN], double min_pivot, double (&l)[kN][kN]) {
  for (int j = 0; j < kN; ++j) {
    double d = a[j][j];
    for (int k = 0; k < j; ++k) d -= l[j][k] * l[j][k];
    if (!(d > min_pivot)) return false;
    l[j][j] = std::sqrt(d);
    for (int i = j + 1; i < kN; ++i) {
      double v = a[i][j];
      for (int k = 0; k < j; ++k) v -= l[i][k] * l[j][k];
      l[i][j] = v / l[j][j];
    }
  }
  return true;
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
  if (!Cholesky(s, kMinRelativePivot * max_diagonal, l)) return bounds;  // precision stays 0
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

SharedHessianPruning ComputeSharedHessianPruning(const BlockHessiansView& hessians) {
  SharedHessianPruning out;
  if (hessians.data == nullptr) return out;
  auto bounds =
      std::make_shared<const std::vector<HessianBlockBounds>>(ComputeHessianBlockBounds(hessians));
  out.screens = std::make_shared<const std::vector<HessianBlockScreen>>(
      ComputeHessianBlockScreens(hessians, *bounds));
  out.bounds = std::move(bounds);
  return out;
}

void SharedHessianPruning::AttachTo(QuantizeRequest* request) const {
  request->hessian_bounds = bounds == nullptr ? nullptr : bounds->data();
  request->hessian_screens = screens == nullptr ? nullptr : screens->data();
}

HessianBlockBounds IdentityBounds() {
  HessianBlockBounds bounds{};
  for (float& p : bounds.precision) p = RoundDown(1.0 - 1e-6);
  bounds.abs_norm = 1.0f;
  return bounds;
}

HessianBlockScreen ComputeHessianBlockScreen(const float* h, const HessianBlockBounds& bounds) {
  HessianBlockScreen out{};
  // M: the channels of highest precision 1 / (S^-1)_mm (first index on ties).
  int order[kN];
  for (int i = 0; i < kN; ++i) order[i] = i;
  std::stable_sort(order, order + kN,
                   [&](int a, int b) { return bounds.precision[a] > bounds.precision[b]; });
  if (!(bounds.precision[order[kScreenElements - 1]] > 0.0f)) return out;  // S not safely PD
  // Elimination order: the other channels first (ascending), then M.
  int permutation[kN];
  bool in_screen[kN] = {};
  for (int i = 0; i < kScreenElements; ++i) in_screen[order[i]] = true;
  int n = 0;
  for (int i = 0; i < kN; ++i) {
    if (!in_screen[i]) permutation[n++] = i;
  }
  for (int i = 0; i < kScreenElements; ++i) permutation[n++] = order[i];
  // A = P S P^T - delta I. The Cholesky factor computed in double is the exact factor of
  // A + E with |E| <= 17 * 2^-53 |L| |L^T|, i.e. ||E||_2 below 16 * 17 * 2^-53 trace(S) <
  // 4e-14 trace(S); delta = 1e-12 trace(S) covers it, so L L^T <= P S P^T.
  double a[kN][kN];
  double trace = 0.0;
  for (int i = 0; i < kN; ++i) {
    trace += static_cast<double>(h[i * kN + i]);
  }
  const double delta = 1e-12 * trace;
  for (int i = 0; i < kN; ++i) {
    for (int j = 0; j < kN; ++j) {
      const int r = permutation[i];
      const int c = permutation[j];
      a[i][j] = 0.5 * (static_cast<double>(h[r * kN + c]) + static_cast<double>(h[c * kN + r])) -
                (i == j ? delta : 0.0);
    }
  }
  double l[kN][kN] = {};
  if (!Cholesky(a, 0.0, l)) return out;
  constexpr int kFirst = kN - kScreenElements;
  double frobenius = 0.0;
  int at = 0;
  for (int i = 0; i < kScreenElements; ++i) {
    for (int j = 0; j <= i; ++j) {
      const double v = l[kFirst + i][kFirst + j];
      out.factor[at++] = static_cast<float>(v);
      frobenius += v * v;
    }
    out.element[i] = static_cast<uint8_t>(order[i]);
  }
  // kappa = 2^-20 ||L_MM||_F: the factor's rounding to fp32 (2^-24) and the fp32 sums of up to
  // eight products (8.1 * 2^-24) stay below it.
  const double kappa_squared = std::ldexp(frobenius, -40);
  out.kappa_squared = RoundUp(255.0 * kappa_squared * (1.0 + 1e-6));
  out.valid = 1;
  return out;
}

std::vector<HessianBlockScreen> ComputeHessianBlockScreens(
    const BlockHessiansView& hessians, const std::vector<HessianBlockBounds>& bounds) {
  std::vector<HessianBlockScreen> out;
  if (hessians.data == nullptr) return out;
  out.reserve(static_cast<size_t>(hessians.num_blocks));
  for (int64_t j = 0; j < hessians.num_blocks; ++j) {
    out.push_back(
        ComputeHessianBlockScreen(hessians.data + j * kN * kN, bounds[static_cast<size_t>(j)]));
  }
  return out;
}

}  // namespace nvfp4cal
