// gptq on the GPU for Llama-3-8B-shaped decoder layers: factorisation (cuSOLVER), quantization
// with propagation and the local_hessian comparison, per tensor and per layer, extrapolated to
// 32 layers.
//
//   cuda_gptq_bench [--layers=N] [--streams=S] [--update=ordered|cublas] [--search=sweep|dss]
//                   [--nocompare] [--measure_update] [--cpu_rows=R] [--serial_plans]
//                   [--pool_strict] [--pool_keep_gib=G] [--inverse=gemm|trmm|trtri]
//                   [--pipelined [--plan_ahead]] [--pin_host] [--pageable]
//
// A layer: q, k, v share the attention input's Hessian, gate and up the MLP input's; o and down
// have their own (4 Hessians, n = 4096 x 3 and 14336). Hessians: MakeExampleFullHessian; weights:
// example bf16 weights. The 4 plans are prepared first (each on one of the S backends), then the
// 7 tensors run on S backends (CUDA streams) at once, as the CLI runs them. Layers after the
// first reuse the data: the figures are steady-state timings. --cpu_rows=R also runs the CPU
// backend on the first R rows of q_proj (same plan parameters) for the speed-up.
// Every layer's timeline (start and end of each plan and tensor, seconds since the layer began)
// shows how the streams overlap. --serial_plans prepares the plans one after another (each
// plan's time alone); --pool_strict forbids the stream-ordered allocator to reuse memory freed
// on another stream before that stream's work is known to be done (no hidden cross-stream
// waits); --pool_keep_gib=G lets the default pool keep up to G GiB of freed memory across
// synchronisations (the release threshold; CUDA's default 0 hands it back at each one, so the
// next plan's temporaries are mapped again). --inverse picks how the factor is inverted
// (CudaGptqInverse: the blocked tree with DGEMMs, the default, or with trmm, or cuSOLVER's trtri).
//
// --pipelined runs the N layers as the CLI does, without a barrier between layers: S workers
// take the layers' tensors in order, the first tensor that needs a plan prepares it (later ones
// wait for it) and a plan is dropped after its layer's last tensor. The Hessians count as
// checked by their reader (FullHessianView::values_checked, as the CLI's reader sets it), so the
// figure is the quantize time with the Hessians in memory; their reading is the CLI's `read`.
// Every layer's digests must equal the first layer's (same data). With --plan_ahead a planner
// thread on a backend (stream) of its own prepares the plans in layer order instead, up to two
// layers ahead of the oldest layer whose plans are still in use; the workers only quantize.
// --pin_host page-locks the generated Hessians and weights (cudaHostRegister), so that their
// copies to the device run at the bus's pace instead of through the driver's pageable staging.
// --pageable copies H and the weights directly from pageable memory instead of through the
// backend's pinned staging (CudaGptqOptions::staged_copies off).
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nvfp4cal/kernels/cuda_gptq.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/gptq.h"

namespace {

struct Linear {
  const char* name;
  int64_t rows;
  int64_t cols;
  int hessian;
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// FNV-1a of the codes, then the scales: builds and options that must agree print the same
// digests.
uint64_t Digest(const std::vector<uint8_t>& codes, const std::vector<uint8_t>& scales) {
  uint64_t digest = 14695981039346656037ull;
  for (const std::vector<uint8_t>* bytes : {&codes, &scales}) {
    for (uint8_t byte : *bytes) digest = (digest ^ byte) * 1099511628211ull;
  }
  return digest;
}

void Fail(const absl::Status& status, const char* what) {
  std::fprintf(stderr, "%s: %s\n", what, std::string(status.message()).c_str());
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 1;
  int streams = 3;
  int64_t cpu_rows = 0;
  bool serial_plans = false;
  bool pipelined = false;
  bool plan_ahead = false;
  bool pool_strict = false;
  bool pin_host = false;
  int64_t pool_keep_gib = -1;
  nvfp4cal::CudaGptqOptions options;
  nvfp4cal::SearchParams params;
  params.method = nvfp4cal::Method::kGptq;
  params.gptq.compare_local_hessian = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--layers=", 0) == 0) {
      layers = std::atoi(arg.c_str() + 9);
    } else if (arg.rfind("--streams=", 0) == 0) {
      streams = std::atoi(arg.c_str() + 10);
    } else if (arg == "--update=cublas") {
      options.update = nvfp4cal::CudaGptqUpdate::kCublas;
    } else if (arg == "--update=ordered") {
      options.update = nvfp4cal::CudaGptqUpdate::kOrdered;
    } else if (arg == "--search=dss") {
      params.gptq.scale_search = nvfp4cal::GptqScaleSearch::kDss;
    } else if (arg == "--search=sweep") {
      params.gptq.scale_search = nvfp4cal::GptqScaleSearch::kSweep;
    } else if (arg == "--nocompare") {
      params.gptq.compare_local_hessian = false;
    } else if (arg == "--inverse=trtri") {
      options.inverse = nvfp4cal::CudaGptqInverse::kCusolverTrtri;
    } else if (arg == "--inverse=trmm") {
      options.inverse = nvfp4cal::CudaGptqInverse::kBlockedTrmm;
    } else if (arg == "--inverse=gemm") {
      options.inverse = nvfp4cal::CudaGptqInverse::kBlockedGemm;
    } else if (arg == "--measure_update") {
      options.measure_update = true;
    } else if (arg == "--serial_plans") {
      serial_plans = true;
    } else if (arg == "--pageable") {
      options.staged_copies = false;
    } else if (arg == "--pin_host") {
      pin_host = true;
    } else if (arg == "--pool_strict") {
      pool_strict = true;
    } else if (arg.rfind("--pool_keep_gib=", 0) == 0) {
      pool_keep_gib = std::atoll(arg.c_str() + 16);
    } else if (arg == "--pipelined") {
      pipelined = true;
    } else if (arg == "--plan_ahead") {
      plan_ahead = true;
    } else if (arg.rfind("--cpu_rows=", 0) == 0) {
      cpu_rows = std::atoll(arg.c_str() + 11);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  if (pool_strict) {
    cudaMemPool_t pool = nullptr;
    int off = 0;
    if (cudaDeviceGetDefaultMemPool(&pool, options.device) != cudaSuccess ||
        cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &off) !=
            cudaSuccess ||
        cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowOpportunistic, &off) != cudaSuccess) {
      std::fprintf(stderr, "--pool_strict: cannot set the default memory pool's attributes\n");
      return 1;
    }
  }
  if (pool_keep_gib >= 0) {
    cudaMemPool_t pool = nullptr;
    uint64_t keep = static_cast<uint64_t>(pool_keep_gib) << 30;
    if (cudaDeviceGetDefaultMemPool(&pool, options.device) != cudaSuccess ||
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess) {
      std::fprintf(stderr, "--pool_keep_gib: cannot set the default pool's release threshold\n");
      return 1;
    }
  }
  std::vector<std::unique_ptr<nvfp4cal::GptqBackend>> backends;
  for (int s = 0; s < streams; ++s) {
    absl::StatusOr<std::unique_ptr<nvfp4cal::GptqBackend>> b = nvfp4cal::MakeCudaGptq(options);
    if (!b.ok()) Fail(b.status(), "MakeCudaGptq");
    backends.push_back(*std::move(b));
  }
  const std::vector<Linear> layer = {{"q_proj", 4096, 4096, 0},     {"k_proj", 1024, 4096, 0},
                                     {"v_proj", 1024, 4096, 0},     {"o_proj", 4096, 4096, 1},
                                     {"gate_proj", 14336, 4096, 2}, {"up_proj", 14336, 4096, 2},
                                     {"down_proj", 4096, 14336, 3}};
  const int64_t hessian_n[4] = {4096, 4096, 4096, 14336};
  const auto gen_start = std::chrono::steady_clock::now();
  std::vector<std::vector<float>> hessians;
  for (int k = 0; k < 4; ++k) {
    hessians.push_back(
        nvfp4cal::MakeExampleFullHessian(hessian_n[k], 100 + static_cast<uint64_t>(k)));
  }
  std::vector<std::vector<uint16_t>> weights;
  for (size_t t = 0; t < layer.size(); ++t) {
    weights.push_back(nvfp4cal::MakeExampleWeightsBf16(layer[t].rows, layer[t].cols, 10 + t));
  }
  std::printf("data generated in %.1f s\n", SecondsSince(gen_start));
  if (pin_host) {
    const auto pin_start = std::chrono::steady_clock::now();
    auto pin = [](void* data, size_t bytes) {
      if (cudaHostRegister(data, bytes, cudaHostRegisterDefault) != cudaSuccess) {
        std::fprintf(stderr, "--pin_host: cudaHostRegister of %zu bytes failed\n", bytes);
        std::exit(1);
      }
    };
    for (std::vector<float>& h : hessians) pin(h.data(), h.size() * sizeof(float));
    for (std::vector<uint16_t>& w : weights) pin(w.data(), w.size() * sizeof(uint16_t));
    std::printf("host data page-locked in %.1f s\n", SecondsSince(pin_start));
  }
  if (!pipelined) {
    // The plans' host check of the largest H alone, three times each: in the generated vector,
    // and in copies whose pages were advised for and against transparent huge pages (the check
    // reads H and its transpose in 64 x 64 tiles; its time varied 20x between processes).
    const int64_t n = hessian_n[3];
    const size_t bytes = static_cast<size_t>(n * n) * sizeof(float);
    auto time_checks = [&](const float* data, const char* label) {
      std::printf("host check of H (n = %lld), %s:", static_cast<long long>(n), label);
      for (int k = 0; k < 3; ++k) {
        const auto check_start = std::chrono::steady_clock::now();
        absl::Status checked = nvfp4cal::ValidateGptqHessian({data, n}, params);
        if (!checked.ok()) Fail(checked, "ValidateGptqHessian");
        std::printf(" %.3f s", SecondsSince(check_start));
      }
      std::printf("\n");
    };
    time_checks(hessians[3].data(), "generated vector");
    for (int advice : {MADV_HUGEPAGE, MADV_NOHUGEPAGE}) {
      const size_t mapped = (bytes + (size_t{2} << 20) - 1) / (size_t{2} << 20) * (size_t{2} << 20);
      void* copy =
          mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (copy == MAP_FAILED) continue;
      madvise(copy, mapped, advice);
      std::memcpy(copy, hessians[3].data(), bytes);
      time_checks(static_cast<const float*>(copy),
                  advice == MADV_HUGEPAGE ? "copy, MADV_HUGEPAGE" : "copy, MADV_NOHUGEPAGE");
      munmap(copy, mapped);
    }
  }
  std::printf("update %s, scale search %s, compare %s, %d stream(s)\n",
              options.update == nvfp4cal::CudaGptqUpdate::kOrdered ? "ordered" : "cublas",
              params.gptq.scale_search == nvfp4cal::GptqScaleSearch::kDss ? "dss" : "sweep",
              params.gptq.compare_local_hessian ? "on" : "off", streams);

  if (pipelined) {
    // Jobs in the CLI's order: layer by layer, tensors in the layer's order.
    struct PlanSlot {
      std::mutex mutex;
      std::condition_variable ready;
      bool preparing = false;
      std::shared_ptr<const nvfp4cal::GptqPlan> plan;
      int users_left = 0;
    };
    std::vector<PlanSlot> slots(static_cast<size_t>(layers) * 4);
    for (int l = 0; l < layers; ++l) {
      for (const Linear& lin : layer) slots[static_cast<size_t>(l * 4 + lin.hessian)].users_left++;
    }
    const size_t jobs = static_cast<size_t>(layers) * layer.size();
    std::vector<uint64_t> digests(jobs);
    std::vector<double> plan_seconds(jobs, 0.0);
    std::atomic<size_t> next{0};
    std::unique_ptr<nvfp4cal::GptqBackend> planner_backend;
    if (plan_ahead) {
      absl::StatusOr<std::unique_ptr<nvfp4cal::GptqBackend>> b = nvfp4cal::MakeCudaGptq(options);
      if (!b.ok()) Fail(b.status(), "MakeCudaGptq (planner)");
      planner_backend = *std::move(b);
      for (PlanSlot& slot : slots) slot.preparing = true;  // the planner's alone
    }
    double planner_seconds = 0.0;
    // Each plan's steps (GptqPlan's timers), summed by size (n = 4096, n = 14336), and the
    // workers' QuantizeRows wall time.
    std::mutex steps_mutex;
    std::map<int64_t, std::array<double, 7>> plan_steps;
    double quantize_rows_seconds = 0.0;
    auto add_steps = [&](const nvfp4cal::GptqPlan& p) {
      std::lock_guard<std::mutex> lock(steps_mutex);
      std::array<double, 7>& s = plan_steps[p.n];
      s[0] += 1;
      s[1] += p.host_seconds;
      s[2] += p.wait_seconds;
      s[3] += p.upload_seconds;
      s[4] += p.potrf_seconds;
      s[5] += p.invert_seconds;
      s[6] += p.store_seconds;
    };
    const auto start = std::chrono::steady_clock::now();
    auto planner = [&] {
      for (size_t s = 0; s < slots.size(); ++s) {
        const int l = static_cast<int>(s / 4);
        // Layer l's plans once layer l - 3's are all gone (at most three layers of plans).
        if (l >= 3) {
          for (size_t old = static_cast<size_t>(l - 3) * 4; old < static_cast<size_t>(l - 2) * 4;
               ++old) {
            std::unique_lock<std::mutex> lock(slots[old].mutex);
            slots[old].ready.wait(lock, [&] { return slots[old].users_left == 0; });
          }
        }
        const int k = static_cast<int>(s % 4);
        const auto plan_start = std::chrono::steady_clock::now();
        nvfp4cal::FullHessianView view{hessians[static_cast<size_t>(k)].data(), hessian_n[k]};
        view.values_checked = true;
        absl::StatusOr<std::shared_ptr<const nvfp4cal::GptqPlan>> p =
            planner_backend->Prepare(view, params);
        if (!p.ok()) Fail(p.status(), "Prepare (planner)");
        planner_seconds += SecondsSince(plan_start);
        add_steps(**p);
        std::lock_guard<std::mutex> lock(slots[s].mutex);
        slots[s].plan = *std::move(p);
        slots[s].ready.notify_all();
      }
    };
    std::thread planner_thread;
    if (plan_ahead) planner_thread = std::thread(planner);
    auto work = [&](nvfp4cal::GptqBackend* backend) {
      for (size_t j = next++; j < jobs; j = next++) {
        const size_t t = j % layer.size();
        const Linear& lin = layer[t];
        PlanSlot& slot = slots[j / layer.size() * 4 + static_cast<size_t>(lin.hessian)];
        std::shared_ptr<const nvfp4cal::GptqPlan> plan;
        {
          std::unique_lock<std::mutex> lock(slot.mutex);
          if (slot.plan == nullptr && !slot.preparing) {
            slot.preparing = true;
            lock.unlock();
            const auto plan_start = std::chrono::steady_clock::now();
            nvfp4cal::FullHessianView view{hessians[static_cast<size_t>(lin.hessian)].data(),
                                           hessian_n[lin.hessian]};
            view.values_checked = true;
            absl::StatusOr<std::shared_ptr<const nvfp4cal::GptqPlan>> p =
                backend->Prepare(view, params);
            if (!p.ok()) Fail(p.status(), "Prepare");
            plan_seconds[j] = SecondsSince(plan_start);
            add_steps(**p);
            lock.lock();
            slot.plan = *std::move(p);
            slot.ready.notify_all();
          }
          slot.ready.wait(lock, [&] { return slot.plan != nullptr; });
          plan = slot.plan;
        }
        std::vector<uint8_t> codes(static_cast<size_t>(lin.rows * lin.cols / 2));
        std::vector<uint8_t> scales(static_cast<size_t>(lin.rows * lin.cols / 16));
        const nvfp4cal::WeightView view{weights[t].data(), nvfp4cal::DType::kBFloat16, lin.rows,
                                        lin.cols};
        nvfp4cal::TensorStats stats;
        const auto rows_start = std::chrono::steady_clock::now();
        absl::Status s = backend->QuantizeRows(
            *plan, view, 8.0f, 0, lin.rows, params.gptq.compare_local_hessian,
            nvfp4cal::RowRangeOutput{absl::MakeSpan(codes), absl::MakeSpan(scales)}, &stats);
        if (!s.ok()) Fail(s, lin.name);
        {
          std::lock_guard<std::mutex> lock(steps_mutex);
          quantize_rows_seconds += SecondsSince(rows_start);
        }
        digests[j] = Digest(codes, scales);
        plan.reset();
        std::lock_guard<std::mutex> lock(slot.mutex);
        if (--slot.users_left == 0) {
          slot.plan.reset();
          slot.ready.notify_all();  // the planner may wait for this
        }
      }
    };
    std::vector<std::thread> pool;
    for (int s = 1; s < streams; ++s)
      pool.emplace_back(work, backends[static_cast<size_t>(s)].get());
    work(backends[0].get());
    for (std::thread& t : pool) t.join();
    if (planner_thread.joinable()) planner_thread.join();
    const double wall = SecondsSince(start);
    int mismatches = 0;
    for (size_t j = layer.size(); j < jobs; ++j)
      mismatches += digests[j] != digests[j % layer.size()];
    double plans_total = planner_seconds;
    for (double p : plan_seconds) plans_total += p;
    std::printf(
        "\npipelined: %d layers in %.3f s (%.3f s per layer, 32 layers at this pace: "
        "%.1f s); plans %.3f s summed over the %s; digests of later layers that "
        "differ from layer 0's: %d\n",
        layers, wall, wall / layers, 32.0 * wall / layers, plans_total,
        plan_ahead ? "planner (a stream of its own)" : "workers", mismatches);
    std::printf("digests:");
    for (size_t t = 0; t < layer.size(); ++t) {
      std::printf(" %s %016llx", layer[t].name, static_cast<unsigned long long>(digests[t]));
    }
    std::printf("\nQuantizeRows %.3f s summed over the workers\n", quantize_rows_seconds);
    for (const auto& [n, s] : plan_steps) {
      std::printf(
          "plans n = %lld: %.0f, summed: host %.3f, wait for the backend %.3f, upload %.3f, "
          "potrf %.3f, invert %.3f, store %.3f s\n",
          static_cast<long long>(n), s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    }
    return mismatches == 0 ? 0 : 1;
  }

  double total_wall = 0.0;
  for (int l = 0; l < layers; ++l) {
    const auto layer_start = std::chrono::steady_clock::now();
    std::vector<std::shared_ptr<const nvfp4cal::GptqPlan>> plans(4);
    double plan_span[4][2] = {};
    {
      auto prepare = [&](int k) {
        plan_span[k][0] = SecondsSince(layer_start);
        absl::StatusOr<std::shared_ptr<const nvfp4cal::GptqPlan>> p =
            backends[static_cast<size_t>(k % streams)]->Prepare(
                {hessians[static_cast<size_t>(k)].data(), hessian_n[k]}, params);
        if (!p.ok()) Fail(p.status(), "Prepare");
        plans[static_cast<size_t>(k)] = *std::move(p);
        plan_span[k][1] = SecondsSince(layer_start);
      };
      std::vector<std::thread> pool;
      for (int k = 0; k < 4; ++k) {
        if (serial_plans) {
          prepare(k);
        } else {
          pool.emplace_back(prepare, k);
        }
      }
      for (std::thread& t : pool) t.join();
    }
    const double prepare_wall = SecondsSince(layer_start);
    std::vector<nvfp4cal::TensorStats> stats(layer.size());
    std::vector<double> seconds(layer.size());
    std::vector<double> begins(layer.size());
    std::vector<int> on_stream(layer.size());
    std::vector<uint64_t> digests(layer.size());
    std::atomic<size_t> next{0};
    auto work = [&](nvfp4cal::GptqBackend* backend, int stream_index) {
      for (size_t t = next++; t < layer.size(); t = next++) {
        const Linear& lin = layer[t];
        std::vector<uint8_t> codes(static_cast<size_t>(lin.rows * lin.cols / 2));
        std::vector<uint8_t> scales(static_cast<size_t>(lin.rows * lin.cols / 16));
        const nvfp4cal::WeightView view{weights[t].data(), nvfp4cal::DType::kBFloat16, lin.rows,
                                        lin.cols};
        const auto start = std::chrono::steady_clock::now();
        begins[t] = SecondsSince(layer_start);
        on_stream[t] = stream_index;
        absl::Status s = backend->QuantizeRows(
            *plans[static_cast<size_t>(lin.hessian)], view, 8.0f, 0, lin.rows,
            params.gptq.compare_local_hessian,
            nvfp4cal::RowRangeOutput{absl::MakeSpan(codes), absl::MakeSpan(scales)}, &stats[t]);
        if (!s.ok()) Fail(s, lin.name);
        seconds[t] = SecondsSince(start);
        digests[t] = Digest(codes, scales);
      }
    };
    std::vector<std::thread> pool;
    for (int s = 1; s < streams; ++s)
      pool.emplace_back(work, backends[static_cast<size_t>(s)].get(), s);
    work(backends[0].get(), 0);
    for (std::thread& t : pool) t.join();
    const double wall = SecondsSince(layer_start);
    total_wall += wall;
    std::printf("\nlayer %d: %.3f s wall (plans %.3f s)\n", l, wall, prepare_wall);
    std::printf("timeline:");
    for (int k = 0; k < 4; ++k) {
      std::printf(" plan%d[s%d %.3f-%.3f]", k, k % streams, plan_span[k][0], plan_span[k][1]);
    }
    for (size_t t = 0; t < layer.size(); ++t) {
      std::printf(" %s[s%d %.3f-%.3f]", layer[t].name, on_stream[t], begins[t],
                  begins[t] + seconds[t]);
    }
    std::printf("\ndigests:");
    for (size_t t = 0; t < layer.size(); ++t) {
      std::printf(" %s %016llx", layer[t].name, static_cast<unsigned long long>(digests[t]));
    }
    std::printf("\n");
    if (l == layers - 1) {  // steady state
      std::printf("%-10s %6s %6s %9s %9s %9s %9s %14s %14s %8s\n", "tensor", "rows", "cols",
                  "wall_s", "quant_s", "update_s", "compare_s", "tr_gptq", "tr_lh", "change");
      for (size_t t = 0; t < layer.size(); ++t) {
        const nvfp4cal::GptqStats& g = stats[t].gptq;
        std::printf("%-10s %6lld %6lld %9.3f %9.3f %9.3f %9.3f %14.6g %14.6g %7.1f%%\n",
                    layer[t].name, static_cast<long long>(layer[t].rows),
                    static_cast<long long>(layer[t].cols), seconds[t], g.quantize_seconds,
                    g.update_seconds, g.compare_seconds, g.full_hessian_error,
                    g.full_hessian_error_local_hessian,
                    g.full_hessian_error_local_hessian > 0
                        ? 100.0 * (g.full_hessian_error / g.full_hessian_error_local_hessian - 1.0)
                        : 0.0);
      }
      for (int k = 0; k < 4; ++k) {
        std::printf(
            "plan %d (n = %lld): %.3f s (host %.3f, waiting %.3f, upload %.3f, potrf %.3f, "
            "inverse %.3f, store %.3f), %.0f MB on the device, damping %g\n",
            k, static_cast<long long>(hessian_n[k]), plans[static_cast<size_t>(k)]->factor_seconds,
            plans[static_cast<size_t>(k)]->host_seconds,
            plans[static_cast<size_t>(k)]->wait_seconds,
            plans[static_cast<size_t>(k)]->upload_seconds,
            plans[static_cast<size_t>(k)]->potrf_seconds,
            plans[static_cast<size_t>(k)]->invert_seconds,
            plans[static_cast<size_t>(k)]->store_seconds,
            static_cast<double>(plans[static_cast<size_t>(k)]->memory_bytes) / 1e6,
            plans[static_cast<size_t>(k)]->damping_relative);
      }
    }
  }
  const double per_layer = total_wall / layers;
  std::printf("\nper layer %.3f s (mean of %d), 32 layers extrapolated: %.1f s\n", per_layer,
              layers, 32.0 * per_layer);

  if (cpu_rows > 0) {
    const Linear& q = layer[0];
    const nvfp4cal::WeightView view{weights[0].data(), nvfp4cal::DType::kBFloat16, q.rows, q.cols};
    std::unique_ptr<nvfp4cal::GptqBackend> cpu = nvfp4cal::MakeCpuGptq({});
    const auto prep = std::chrono::steady_clock::now();
    absl::StatusOr<std::shared_ptr<const nvfp4cal::GptqPlan>> plan =
        cpu->Prepare({hessians[0].data(), q.cols}, params);
    if (!plan.ok()) Fail(plan.status(), "cpu Prepare");
    const double cpu_prepare = SecondsSince(prep);
    std::vector<uint8_t> codes(static_cast<size_t>(cpu_rows * q.cols / 2));
    std::vector<uint8_t> scales(static_cast<size_t>(cpu_rows * q.cols / 16));
    nvfp4cal::TensorStats cpu_stats;
    const auto start = std::chrono::steady_clock::now();
    absl::Status s = cpu->QuantizeRows(
        **plan, view, 8.0f, 0, cpu_rows, params.gptq.compare_local_hessian,
        nvfp4cal::RowRangeOutput{absl::MakeSpan(codes), absl::MakeSpan(scales)}, &cpu_stats);
    if (!s.ok()) Fail(s, "cpu QuantizeRows");
    const double cpu_seconds = SecondsSince(start);
    std::printf(
        "cpu (%u threads): q_proj factor %.3f s, %lld rows in %.3f s -> %.1f s for all "
        "%lld rows\n",
        std::thread::hardware_concurrency(), cpu_prepare, static_cast<long long>(cpu_rows),
        cpu_seconds, cpu_seconds * static_cast<double>(q.rows) / static_cast<double>(cpu_rows),
        static_cast<long long>(q.rows));
  }
  return 0;
}
