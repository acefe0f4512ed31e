// Validation of gptq requests and the inverse-Hessian factor (LAPACK, double precision).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/codecs.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/validation.h"

// LAPACK (Fortran calling convention; the trailing arguments are the hidden string lengths).
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info, size_t uplo_len);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda, int* info,
             size_t uplo_len, size_t diag_len);
}

namespace nvfp4cal {
namespace {

// LAPACK takes 32-bit sizes; this also bounds the factor's memory (8 n^2 bytes).
constexpr int64_t kMaxGptqColumns = 65536;

// Damping stops growing tenfold at this multiple of the mean diagonal (or the requested value).
constexpr double kMaxAutomaticDamping = 1.0;

}  // namespace

absl::Status ValidateGptqHessian(const FullHessianView& h, const SearchParams& params) {
  if (params.method != Method::kGptq) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "params.method = %s; gptq backends run method gptq only", MethodName(params.method)));
  }
  if (absl::Status s = ValidateParams(params); !s.ok()) return s;
  if (h.data == nullptr) {
    return absl::FailedPreconditionError(
        "hessian: method gptq needs the full Hessian [in, in] and none was given");
  }
  if (h.n <= 0 || h.n % kBlockSize != 0 || h.n > kMaxGptqColumns) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "hessian.n = %d; must be a positive multiple of %d and at most the gptq limit %d", h.n,
        kBlockSize, kMaxGptqColumns));
  }
  const int64_t n = h.n;
  float max_diagonal = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float d = h.data[i * n + i];
    if (!std::isfinite(d) || d < 0.0f) {
      return absl::InvalidArgumentError(
          absl::StrFormat("hessian[%d, %d] = %g; the diagonal must be finite and >= 0", i, i, d));
    }
    max_diagonal = std::max(max_diagonal, d);
  }
  if (h.values_checked) return absl::OkStatus();
  const float limit = params.symmetry_tolerance * max_diagonal;
  // Tiles of 64 x 64 against their mirror, so both reads stay in cache (n^2 elements, up to
  // 4 GiB of H); rows of tiles spread over threads. The failure reported is the first in
  // (tile row, tile column, a, b) order, whatever the thread count.
  constexpr int64_t kTile = 64;
  const int64_t tile_rows = (n + kTile - 1) / kTile;
  std::vector<absl::Status> failures(static_cast<size_t>(tile_rows));
  auto check_tile_row = [&](int64_t a0) -> absl::Status {
    for (int64_t b0 = a0; b0 < n; b0 += kTile) {
      for (int64_t a = a0; a < std::min(n, a0 + kTile); ++a) {
        for (int64_t b = std::max(a, b0); b < std::min(n, b0 + kTile); ++b) {
          const float x = h.data[a * n + b];
          const float y = h.data[b * n + a];
          if (!std::isfinite(x) || !std::isfinite(y)) {
            return absl::InvalidArgumentError(absl::StrFormat(
                "hessian[%d, %d] = %g; values must be finite", std::isfinite(x) ? b : a,
                std::isfinite(x) ? a : b, std::isfinite(x) ? y : x));
          }
          if (std::fabs(x - y) > limit) {
            return absl::InvalidArgumentError(absl::StrFormat(
                "hessian is not symmetric: H[%d, %d] = %g but H[%d, %d] = %g; limit "
                "symmetry_tolerance (%g) x max diagonal (%g) = %g",
                a, b, x, b, a, y, params.symmetry_tolerance, max_diagonal, limit));
          }
        }
      }
    }
    return absl::OkStatus();
  };
  // Small matrices on the calling thread; large ones (>= 1M elements) on up to 16 threads.
  const int threads = n * n < (int64_t{1} << 20)
                          ? 1
                          : static_cast<int>(std::min<unsigned>(
                                16, std::max(1u, std::thread::hardware_concurrency())));
  auto worker = [&](int first) {
    for (int64_t t = first; t < tile_rows; t += threads) {
      failures[static_cast<size_t>(t)] = check_tile_row(t * kTile);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (std::thread& t : pool) t.join();
  for (absl::Status& f : failures) {
    if (!f.ok()) return f;
  }
  return absl::OkStatus();
}

absl::Status ValidateGptqRequest(const GptqRequest& request) {
  const WeightView& w = request.weights;
  if (request.params.method != Method::kGptq) {
    return absl::InvalidArgumentError(
        absl::StrFormat("params.method = %s; GptqQuantize runs method gptq only",
                        MethodName(request.params.method)));
  }
  // Shape, dtype and parameter checks shared with the other methods (with a method that the
  // block-Hessian validation accepts; the Hessian is checked below).
  QuantizeRequest shape_only;
  shape_only.weights = w;
  shape_only.params = request.params;
  shape_only.params.method = Method::kMse;
  if (absl::Status s = ValidateShapeHessiansAndParams(shape_only); !s.ok()) return s;
  if (w.cols > kMaxGptqColumns) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.cols (in) = %d exceeds the gptq limit %d", w.cols, kMaxGptqColumns));
  }
  const FullHessianView& h = request.hessian;
  if (h.data == nullptr) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "hessian: method gptq needs the full Hessian [%d, %d] and none was given", w.cols, w.cols));
  }
  if (h.n != w.cols) {
    return absl::InvalidArgumentError(
        absl::StrFormat("hessian.n = %d but weights.cols = %d; expected shape [%d, %d]", h.n,
                        w.cols, w.cols, w.cols));
  }
  if (absl::Status s = ValidateGptqHessian(h, request.params); !s.ok()) return s;
  return ScanWeightRows(w, 0, w.rows).status();
}

absl::Status ValidateGptqRows(const GptqPlan& plan, const WeightView& weights, float global_amax,
                              int64_t row_begin, int64_t row_end, const RowRangeOutput& output) {
  QuantizeRequest shape_only;
  shape_only.weights = weights;
  shape_only.params = plan.params;
  shape_only.params.method = Method::kMse;
  if (absl::Status s = ValidateShapeHessiansAndParams(shape_only); !s.ok()) return s;
  if (weights.cols != plan.n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.cols = %d but the gptq plan's Hessian is [%d, %d]", weights.cols, plan.n, plan.n));
  }
  if (absl::Status s = ValidateRowRange(weights, row_begin, row_end, output); !s.ok()) return s;
  absl::StatusOr<float> rows_amax = ScanWeightRows(weights, row_begin, row_end);
  if (!rows_amax.ok()) return rows_amax.status();
  return ValidateGlobalAmax(global_amax, *rows_amax);
}

absl::StatusOr<QuantizedTensor> GptqQuantize(GptqBackend& backend, const GptqRequest& request) {
  if (absl::Status s = ValidateGptqRequest(request); !s.ok()) return s;
  absl::StatusOr<std::shared_ptr<const GptqPlan>> plan =
      backend.Prepare(request.hessian, request.params);
  if (!plan.ok()) return plan.status();
  return GptqQuantizeWithPlan(backend, **plan, request);
}

absl::StatusOr<QuantizedTensor> GptqQuantizeWithPlan(GptqBackend& backend, const GptqPlan& plan,
                                                     const GptqRequest& request) {
  const WeightView& wv = request.weights;
  absl::StatusOr<float> own_amax = ScanWeightRows(wv, 0, wv.rows);
  if (!own_amax.ok()) return own_amax.status();
  const float global_amax = request.global_amax.value_or(*own_amax);
  if (absl::Status s = ValidateGlobalAmax(global_amax, *own_amax); !s.ok()) return s;
  QuantizedTensor result;
  result.rows = wv.rows;
  result.cols = wv.cols;
  result.packed_codes.assign(static_cast<size_t>(wv.rows * wv.cols / 2), 0);
  result.scales.assign(static_cast<size_t>(wv.rows * wv.cols / kBlockSize), 0);
  result.global_amax = global_amax;
  result.global_scale = GlobalScaleFromAmax(global_amax);
  // The codes follow the plan's parameters; the report follows the request.
  SearchParams reported = plan.params;
  reported.gptq.compare_local_hessian = request.params.gptq.compare_local_hessian;
  InitTensorStats(reported, global_amax, &result.stats);
  if (absl::Status s = backend.QuantizeRows(
          plan, wv, global_amax, 0, wv.rows, reported.gptq.compare_local_hessian,
          RowRangeOutput{absl::MakeSpan(result.packed_codes), absl::MakeSpan(result.scales)},
          &result.stats);
      !s.ok()) {
    return s;
  }
  result.stats.gptq.factor_seconds = plan.factor_seconds;
  return result;
}

absl::StatusOr<GptqOrder> ComputeGptqOrder(const FullHessianView& hessian, bool act_order) {
  const int64_t n = hessian.n;
  const int64_t groups = n / kBlockSize;
  GptqOrder order;
  order.group_order.resize(static_cast<size_t>(groups));
  std::iota(order.group_order.begin(), order.group_order.end(), int64_t{0});
  double trace = 0.0;
  std::vector<double> group_mass(static_cast<size_t>(groups), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double d = hessian.data[i * n + i];
    trace += d;
    group_mass[static_cast<size_t>(i / kBlockSize)] += d;
  }
  if (!(trace > 0.0)) {
    return absl::InvalidArgumentError(
        "hessian: every diagonal element is 0 (no calibration input reached this layer); gptq "
        "needs a Hessian collected from calibration data");
  }
  order.mean_diagonal = trace / static_cast<double>(n);
  if (act_order) {
    // Heaviest groups first; ties keep the original order.
    std::stable_sort(order.group_order.begin(), order.group_order.end(), [&](int64_t a, int64_t b) {
      return group_mass[static_cast<size_t>(a)] > group_mass[static_cast<size_t>(b)];
    });
  }
  order.column.resize(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) {
    order.column[static_cast<size_t>(p)] =
        order.group_order[static_cast<size_t>(p / kBlockSize)] * kBlockSize + p % kBlockSize;
  }
  return order;
}

std::vector<float> DiagonalBlocksOf(const float* matrix, int64_t n) {
  const int64_t groups = n / kBlockSize;
  std::vector<float> blocks(static_cast<size_t>(groups * kBlockSize * kBlockSize));
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t a = 0; a < kBlockSize; ++a) {
      const float* row = matrix + (g * kBlockSize + a) * n + g * kBlockSize;
      std::copy(row, row + kBlockSize,
                blocks.begin() + static_cast<std::ptrdiff_t>((g * kBlockSize + a) * kBlockSize));
    }
  }
  return blocks;
}

std::optional<double> NextGptqDamping(double relative, double requested) {
  const double next = relative == 0.0 ? 1e-6 : relative * 10.0;
  if (next > std::max(kMaxAutomaticDamping, requested) * 1.0000001) return std::nullopt;
  return next;
}

absl::Status GptqNotPositiveDefinite(double relative, double mean_diagonal, int64_t column,
                                     double pivot, double requested) {
  return absl::InvalidArgumentError(absl::StrFormat(
      "hessian is not positive definite even with damping %g x mean diagonal (%g): Cholesky "
      "pivot of column %d is %g (started from damping %g; H must be a sum of outer products "
      "x x^T)",
      relative, mean_diagonal, column, pivot, requested));
}

absl::StatusOr<GptqFactor> ComputeGptqFactor(const FullHessianView& hessian,
                                             const GptqParams& params) {
  const int64_t n = hessian.n;
  absl::StatusOr<GptqOrder> order = ComputeGptqOrder(hessian, params.act_order);
  if (!order.ok()) return order.status();
  GptqFactor factor;
  factor.n = n;
  factor.group_order = order->group_order;
  factor.column = order->column;
  const double mean_diagonal = order->mean_diagonal;
  const std::vector<int64_t>& column = order->column;

  // U is upper triangular with A^-1 = U^T U for A = H_perm + lambda I. With J the reversal
  // permutation and J A J = L L^T (Cholesky), A = R R^T for the upper triangular R = J L J, so
  // U = R^-1 = J L^-1 J: one dpotrf and one dtrtri, no explicit inverse of A.
  // Column-major buffer B(i, j) = A(n-1-i, n-1-j) (symmetric, so the layout does not matter).
  const int size = static_cast<int>(n);
  std::vector<double> b(static_cast<size_t>(n * n));
  double relative = params.damping;
  for (int attempt = 0;; ++attempt) {
    const double lambda = relative * mean_diagonal;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ci = column[static_cast<size_t>(n - 1 - i)];
      for (int64_t j = i; j < n; ++j) {  // lower triangle of B, column j
        const int64_t cj = column[static_cast<size_t>(n - 1 - j)];
        b[static_cast<size_t>(j + i * n)] = hessian.data[ci * n + cj];
      }
      b[static_cast<size_t>(i + i * n)] += lambda;
    }
    int info = 0;
    dpotrf_("L", &size, b.data(), &size, &info, 1);
    if (info == 0) {
      factor.damping_relative = relative;
      factor.damping_absolute = lambda;
      factor.damping_increases = attempt;
      break;
    }
    if (info < 0) return absl::InternalError(absl::StrFormat("dpotrf: argument %d", -info));
    const std::optional<double> next = NextGptqDamping(relative, params.damping);
    if (!next.has_value()) {
      // The failing pivot: LAPACK stops at leading minor `info` of B and leaves the non-positive
      // Schur complement value on the diagonal there.
      const int64_t r = info - 1;
      return GptqNotPositiveDefinite(relative, mean_diagonal,
                                     column[static_cast<size_t>(n - 1 - r)],
                                     b[static_cast<size_t>(r + r * n)], params.damping);
    }
    relative = *next;
  }
  int info = 0;
  dtrtri_("L", "N", &size, b.data(), &size, &info, 1, 1);
  if (info != 0) {
    return absl::InternalError(absl::StrFormat("dtrtri failed with info = %d", info));
  }
  factor.inverse_factor.assign(static_cast<size_t>(n * n), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      // U(i, j) = Linv(n-1-i, n-1-j), lower triangle of the column-major buffer.
      factor.inverse_factor[static_cast<size_t>(i * n + j)] =
          static_cast<float>(b[static_cast<size_t>((n - 1 - i) + (n - 1 - j) * n)]);
    }
  }
  return factor;
}

}  // namespace nvfp4cal
