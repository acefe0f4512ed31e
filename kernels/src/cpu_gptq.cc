// CPU driver of the gptq method: row tasks over threads, lazy-batch propagation, statistics.
//
// Rows are independent given H, so a task is a fixed range of rows that runs the whole column
// loop: per 16-column group (gptq_group.h) choose the scale and quantize the group column by
// column, apply its errors to the rest of the current batch of `block_columns` columns at once,
// and after each batch apply the batch's errors to every later column. Every element is updated
// in a fixed order (batch errors ascending), independent of the thread count and of the cache
// blocking below. A second phase computes tr(E H E^T) of the result and of local_hessian's.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nvfp4cal/kernels/dtype.h"
#include "nvfp4cal/kernels/gptq.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/internal/gptq_group.h"
#include "nvfp4cal/kernels/internal/hessian_bounds.h"
#include "nvfp4cal/kernels/validation.h"

#if defined(__clang__)
#define NVFP4CAL_CLONES_FLATTEN __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define NVFP4CAL_CLONES_FLATTEN \
  __attribute__((flatten, target_clones("avx512f", "arch=haswell", "default")))
#endif

namespace nvfp4cal {
namespace {

// Columns per cache block of the trailing update: a task's rows of this width stay in L1/L2
// while every error of the batch is applied.
constexpr int64_t kUpdateChunk = 512;

// A Hessian prepared by the CPU backend: factor, column order and the per-group blocks.
struct CpuGptqPlan : GptqPlan {
  GptqFactor factor;
  std::vector<float> hessian;  // copy of H [n, n] for tr(E H E^T)
  GptqGroupConfig config;
  std::vector<float> hessian_blocks;       // [groups, 16, 16] diagonal blocks of H, original order
  std::vector<HessianBlockBounds> bounds;  // pruning data of those blocks
  std::vector<float> factor_blocks;        // [groups, 16, 16] diagonal blocks of U, quant. order
};

// Everything the tasks of one QuantizeRows call share.
struct GptqTensor {
  const CpuGptqPlan* plan;
  const WeightView* weights;
  int64_t row_begin;  // first row of the call: row row_begin is output row 0
  int64_t n;
  float global_amax;
  float global_scale;
  float unit;          // 2^E of the error units
  float unit_inverse;  // 2^-E
  double objective_unit;
  GptqGroupConfig config;
  RowRangeOutput output;
};

// w[i] -= s * u[i] for i < count (product rounded, then the subtraction).
inline void SubtractScaled(float* w, float s, const float* u, int64_t count) {
  for (int64_t i = 0; i < count; ++i) w[i] = w[i] - s * u[i];
}

// Adds one group's statistics. orig: the group's original weights.
void AddGroupStats(const GptqTensor& t, const float* orig, const float* h, uint8_t scale_byte,
                   const uint8_t* codes, const GptqGroupChoice& choice, TensorStats* stats) {
  const GptqGroupStats g = GptqGroupStatistics(orig, t.global_amax, t.global_scale, t.unit_inverse,
                                               h, scale_byte, codes, t.config.grid);
  const double hessian_before = t.objective_unit * g.hessian_before;
  const double hessian_after = t.objective_unit * g.hessian_after;
  stats->num_blocks += 1;
  stats->mse_before += t.objective_unit * g.mse_before;
  stats->mse_after += t.objective_unit * g.mse_after;
  stats->hessian_error_before += hessian_before;
  stats->hessian_error_after += hessian_after;
  stats->objective_before += hessian_before;
  stats->objective_after += hessian_after;
  stats->blocks_scale_changed += g.scale_changed;
  stats->blocks_beta_not_one += choice.dss_beta_index != 0;
  stats->blocks_offset_not_zero += choice.dss_offset != 0;
  stats->zero_hessian_blocks += g.zero_hessian;
}

// Quantizes rows [first, last) with propagation. Compiled for several instruction sets and
// picked at run time; every variant computes the same bits (-ffp-contract=off, same order).
// GCC also inlines the callees into each variant (flatten); clang rejects flatten together
// with target_clones, and its builds (the sanitizer and fuzzing steps) do without it.
NVFP4CAL_CLONES_FLATTEN void GptqRowsKernel(const GptqTensor& t, int64_t first, int64_t last,
                                            TensorStats* stats) {
  const WeightView& wv = *t.weights;
  const CpuGptqPlan& plan = *t.plan;
  const int64_t n = t.n;
  const int64_t rows = last - first;
  const int64_t batch = plan.params.gptq.block_columns;
  const float* u = plan.factor.inverse_factor.data();
  std::vector<float> work(static_cast<size_t>(rows * n));
  std::vector<float> errors(static_cast<size_t>(rows * batch));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = 0; p < n; p += kBlockSize) {
      LoadAsFloat(wv.data, wv.dtype, (first + r) * n + plan.factor.column[static_cast<size_t>(p)],
                  kBlockSize, &work[static_cast<size_t>(r * n + p)]);
    }
  }
  const int64_t blocks_per_row = n / kBlockSize;
  for (int64_t b0 = 0; b0 < n; b0 += batch) {
    const int64_t b1 = std::min(n, b0 + batch);
    for (int64_t p0 = b0; p0 < b1; p0 += kBlockSize) {
      const int64_t group = plan.factor.group_order[static_cast<size_t>(p0 / kBlockSize)];
      const float* h = &plan.hessian_blocks[static_cast<size_t>(group * kBlockSize * kBlockSize)];
      const float* ub =
          &plan.factor_blocks[static_cast<size_t>((p0 / kBlockSize) * kBlockSize * kBlockSize)];
      for (int64_t r = 0; r < rows; ++r) {
        float* w = &work[static_cast<size_t>(r * n + p0)];
        GptqGroupOutput out{};
        GptqGroupChoice choice{0, 0.0f, 0, 0};
        if (t.global_amax > 0.0f) {
          choice = GptqChooseGroupScale(w, t.global_amax, t.global_scale, h, ub, t.config,
                                        &plan.bounds[static_cast<size_t>(group)]);
          const float d_unit = MulNoContract(ScaleCandidateValue(choice.candidate),
                                             MulNoContract(t.global_scale, t.unit_inverse));
          GptqGroupPass(w, choice.q, d_unit, t.unit, t.unit_inverse, ub, &out);
        }
        // All-zero tensor (g = 0): codes 0, scale byte 0x01, nothing to propagate.
        const uint8_t scale_byte = static_cast<uint8_t>(choice.candidate + 1);
        const int64_t block = (first + r - t.row_begin) * blocks_per_row + group;
        t.output.scales[static_cast<size_t>(block)] = scale_byte;
        for (int i = 0; i < kBlockSize / 2; ++i) {
          t.output.packed_codes[static_cast<size_t>(block * (kBlockSize / 2) + i)] =
              PackE2M1Pair(out.codes[2 * i], out.codes[2 * i + 1]);
        }
        float orig[kBlockSize];
        LoadAsFloat(wv.data, wv.dtype, (first + r) * n + group * kBlockSize, kBlockSize, orig);
        AddGroupStats(t, orig, h, scale_byte, out.codes, choice, stats);
        // The group's errors reach the rest of the batch now.
        for (int i = 0; i < kBlockSize; ++i) {
          const float s = out.scaled_error[i];
          errors[static_cast<size_t>(r * batch + (p0 - b0) + i)] = s;
          const int64_t from = p0 + kBlockSize;
          SubtractScaled(&work[static_cast<size_t>(r * n + from)], s, u + (p0 + i) * n + from,
                         b1 - from);
        }
      }
    }
    // The batch's errors reach every later column, in cache-sized chunks.
    for (int64_t c0 = b1; c0 < n; c0 += kUpdateChunk) {
      const int64_t count = std::min(kUpdateChunk, n - c0);
      for (int64_t k = b0; k < b1; ++k) {
        const float* urow = u + k * n + c0;
        for (int64_t r = 0; r < rows; ++r) {
          SubtractScaled(&work[static_cast<size_t>(r * n + c0)],
                         errors[static_cast<size_t>(r * batch + (k - b0))], urow, count);
        }
      }
    }
  }
}

// tr(E H E^T) of `rows` error rows (double, original column order) as sum_r e_r^T H e_r, using
// the symmetry of H: with T_j = sum_{i <= j} e_i H_ij, e^T H e = sum_j e_j (2 T_j - H_jj e_j).
__attribute__((target_clones("avx512f", "arch=haswell", "default"))) double FullHessianError(
    const float* h, int64_t n, const std::vector<double>& e, int64_t rows) {
  std::vector<double> acc(static_cast<size_t>(rows * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* hrow = h + i * n;
    for (int64_t r = 0; r < rows; ++r) {
      const double ei = e[static_cast<size_t>(r * n + i)];
      if (ei == 0.0) continue;
      double* a = &acc[static_cast<size_t>(r * n)];
      for (int64_t j = i; j < n; ++j) a[j] = a[j] + ei * static_cast<double>(hrow[j]);
    }
  }
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double row = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double ej = e[static_cast<size_t>(r * n + j)];
      row +=
          ej * (2.0 * acc[static_cast<size_t>(r * n + j)] - static_cast<double>(h[j * n + j]) * ej);
    }
    total += row;
  }
  return total;
}

// Error rows W - W_hat (double) of rows [first, last); packed and scales hold those rows' codes
// and scale bytes, starting with row `first`.
void ErrorRows(const GptqTensor& t, int64_t first, int64_t last, const uint8_t* packed,
               const uint8_t* scales, std::vector<double>* e) {
  const WeightView& wv = *t.weights;
  const int64_t n = t.n;
  const int64_t blocks_per_row = n / kBlockSize;
  e->assign(static_cast<size_t>((last - first) * n), 0.0);
  float w[kBlockSize];
  for (int64_t r = first; r < last; ++r) {
    for (int64_t j = 0; j < blocks_per_row; ++j) {
      LoadAsFloat(wv.data, wv.dtype, r * n + j * kBlockSize, kBlockSize, w);
      const int64_t block = (r - first) * blocks_per_row + j;
      const double d =
          static_cast<double>(DecodeE4M3(scales[block])) * static_cast<double>(t.global_scale);
      for (int i = 0; i < kBlockSize; ++i) {
        const uint8_t byte = packed[block * (kBlockSize / 2) + i / 2];
        const uint8_t code = (i % 2 == 0) ? UnpackE2M1Low(byte) : UnpackE2M1High(byte);
        (*e)[static_cast<size_t>((r - first) * n + j * kBlockSize + i)] =
            static_cast<double>(w[i]) - static_cast<double>(DecodeE2M1(code)) * d;
      }
    }
  }
}

// tr(E H E^T) of the gptq result and of local_hessian's for rows [first, last).
NVFP4CAL_CLONES_FLATTEN void CompareRows(const GptqTensor& t, int64_t first, int64_t last,
                                         TensorStats* stats) {
  const int64_t n = t.n;
  const float* h = t.plan->hessian.data();
  const int64_t blocks_per_row = n / kBlockSize;
  std::vector<double> e;
  ErrorRows(
      t, first, last,
      t.output.packed_codes.data() + (first - t.row_begin) * blocks_per_row * (kBlockSize / 2),
      t.output.scales.data() + (first - t.row_begin) * blocks_per_row, &e);
  stats->gptq.full_hessian_error += FullHessianError(h, n, e, last - first);
  // local_hessian on the same rows and g.
  std::vector<uint8_t> packed(static_cast<size_t>((last - first) * blocks_per_row * 8));
  std::vector<uint8_t> scales(static_cast<size_t>((last - first) * blocks_per_row));
  const WeightView& wv = *t.weights;
  float w[kBlockSize];
  const HessianBlockBounds identity = IdentityBounds();
  for (int64_t r = first; r < last; ++r) {
    for (int64_t j = 0; j < blocks_per_row; ++j) {
      LoadAsFloat(wv.data, wv.dtype, r * n + j * kBlockSize, kBlockSize, w);
      const BlockOutcome out =
          QuantizeBlock(w, t.global_amax, t.global_scale,
                        &t.plan->hessian_blocks[static_cast<size_t>(j * kBlockSize * kBlockSize)],
                        BlockMethod::kLocalHessian, t.config.grid,
                        &t.plan->bounds[static_cast<size_t>(j)], &identity);
      const int64_t block = (r - first) * blocks_per_row + j;
      scales[static_cast<size_t>(block)] = out.scale_byte;
      std::copy(out.packed, out.packed + kBlockSize / 2, packed.begin() + block * (kBlockSize / 2));
    }
  }
  ErrorRows(t, first, last, packed.data(), scales.data(), &e);
  stats->gptq.full_hessian_error_local_hessian += FullHessianError(h, n, e, last - first);
}

// Runs fn(task) for task = 0..num_tasks-1 on up to `threads` threads.
void RunTasks(int64_t num_tasks, int threads, const std::function<void(int64_t)>& fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t task = next++; task < num_tasks; task = next++) fn(task);
  };
  const int count = static_cast<int>(std::min<int64_t>(threads, num_tasks));
  std::vector<std::thread> pool;
  for (int i = 1; i < count; ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& th : pool) th.join();
}

class CpuGptq : public GptqBackend {
 public:
  explicit CpuGptq(const CpuGptqOptions& options) : options_(options) {}

  std::string_view BackendName() const override { return "cpu"; }

  absl::StatusOr<std::shared_ptr<const GptqPlan>> Prepare(const FullHessianView& hessian,
                                                          const SearchParams& params) override {
    if (absl::Status s = ValidateGptqHessian(hessian, params); !s.ok()) return s;
    const absl::Time start = absl::Now();
    absl::StatusOr<GptqFactor> factor = ComputeGptqFactor(hessian, params.gptq);
    if (!factor.ok()) return factor.status();
    auto plan = std::make_shared<CpuGptqPlan>();
    const int64_t n = hessian.n;
    const int64_t groups = n / kBlockSize;
    plan->n = n;
    plan->params = params;
    plan->damping_relative = factor->damping_relative;
    plan->damping_increases = factor->damping_increases;
    plan->factor = *std::move(factor);
    plan->hessian.assign(hessian.data, hessian.data + n * n);
    plan->config = GptqGroupConfigOf(params);
    plan->hessian_blocks = DiagonalBlocksOf(hessian.data, n);
    plan->factor_blocks = DiagonalBlocksOf(plan->factor.inverse_factor.data(), n);
    plan->bounds =
        ComputeHessianBlockBounds(BlockHessiansView{plan->hessian_blocks.data(), groups});
    plan->memory_bytes =
        static_cast<int64_t>((plan->hessian.size() + plan->factor.inverse_factor.size() +
                              2 * plan->hessian_blocks.size()) *
                                 sizeof(float) +
                             plan->bounds.size() * sizeof(HessianBlockBounds));
    plan->factor_seconds = absl::ToDoubleSeconds(absl::Now() - start);
    return std::shared_ptr<const GptqPlan>(std::move(plan));
  }

  absl::Status QuantizeRows(const GptqPlan& plan_base, const WeightView& weights, float global_amax,
                            int64_t row_begin, int64_t row_end, bool compare_local_hessian,
                            RowRangeOutput output, TensorStats* stats) override {
    const auto* plan = dynamic_cast<const CpuGptqPlan*>(&plan_base);
    if (plan == nullptr) {
      return absl::InvalidArgumentError(
          "gptq plan: prepared by another backend; prepare it with this (cpu) backend");
    }
    if (absl::Status s = ValidateGptqRows(*plan, weights, global_amax, row_begin, row_end, output);
        !s.ok()) {
      return s;
    }
    GptqTensor t;
    t.plan = plan;
    t.weights = &weights;
    t.row_begin = row_begin;
    t.n = plan->n;
    t.global_amax = global_amax;
    t.global_scale = GlobalScaleFromAmax(global_amax);
    const int exponent = ErrorUnitExponent(t.global_scale);
    t.unit = ErrorUnitInverse(-exponent);
    t.unit_inverse = ErrorUnitInverse(exponent);
    t.objective_unit = ObjectiveUnit(t.global_scale);
    t.config = plan->config;
    t.output = output;

    const int threads = options_.num_threads > 0
                            ? options_.num_threads
                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int64_t rows_per_task = std::max(1, options_.rows_per_task);
    const int64_t num_tasks = (row_end - row_begin + rows_per_task - 1) / rows_per_task;
    std::vector<TensorStats> task_stats(static_cast<size_t>(num_tasks));
    const absl::Time quantize_start = absl::Now();
    RunTasks(num_tasks, threads, [&](int64_t task) {
      const int64_t first = row_begin + task * rows_per_task;
      GptqRowsKernel(t, first, std::min(row_end, first + rows_per_task),
                     &task_stats[static_cast<size_t>(task)]);
    });
    const absl::Time compare_start = absl::Now();
    if (compare_local_hessian) {
      RunTasks(num_tasks, threads, [&](int64_t task) {
        const int64_t first = row_begin + task * rows_per_task;
        CompareRows(t, first, std::min(row_end, first + rows_per_task),
                    &task_stats[static_cast<size_t>(task)]);
      });
    }
    for (const TensorStats& s : task_stats) AccumulateStats(s, stats);
    GptqStats& g = stats->gptq;
    g.damping_relative = plan->damping_relative;
    g.damping_increases = plan->damping_increases;
    g.quantize_seconds += absl::ToDoubleSeconds(compare_start - quantize_start);
    if (compare_local_hessian) {
      g.compare_seconds += absl::ToDoubleSeconds(absl::Now() - compare_start);
    }
    return absl::OkStatus();
  }

 private:
  const CpuGptqOptions options_;
};

}  // namespace

std::unique_ptr<GptqBackend> MakeCpuGptq(const CpuGptqOptions& options) {
  return std::make_unique<CpuGptq>(options);
}

absl::StatusOr<QuantizedTensor> CpuGptqQuantize(const GptqRequest& request,
                                                const CpuGptqOptions& options) {
  CpuGptq backend(options);
  return GptqQuantize(backend, request);
}

}  // namespace nvfp4cal
