#include "kernels/cuda/blas.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "common/log.h"

namespace pdserve::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

Status from_cublas(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return ok_status();
  std::string message = fmt::format("{}: {}", what, cublasGetStatusString(st));
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return resource_exhausted(std::move(message));
  if (st == CUBLAS_STATUS_INVALID_VALUE || st == CUBLAS_STATUS_NOT_SUPPORTED)
    return invalid_argument(std::move(message));
  if (st == CUBLAS_STATUS_NOT_INITIALIZED) return unavailable(std::move(message));
  return internal_error(std::move(message));
}

// cuBLASLt's candidates a tuned product times besides cuBLAS's choice, and the largest scratch
// output a tuning writes (a larger product keeps cuBLAS's choice).
constexpr int kTuneCandidates = 8;
constexpr size_t kTuneScratchBytes = size_t{64} << 20;

// What a product's algorithm depends on besides its row count.
// `align`: the alignment in bytes (a power of two up to 256) that x, w and y all have; a cuBLASLt
// algorithm is chosen for it (the heuristic is told) and used only with pointers aligned as much.
struct Signature {
  int64_t n, k, ldx, ldy;
  bool f32_out, accumulate;
  Dtype dtype;
  uint32_t align;
  auto tie() const { return std::tie(n, k, ldx, ldy, f32_out, accumulate, dtype, align); }
  bool operator<(const Signature& o) const { return tie() < o.tie(); }
};

// The largest power of two up to 256 that divides every address.
uint32_t common_alignment(const void* x, const void* w, const void* y) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) |
                         reinterpret_cast<uintptr_t>(y) | uintptr_t{256};
  return static_cast<uint32_t>(bits & (~bits + 1));
}

// A tuned bucket: cuBLAS's choice, or a cuBLASLt algorithm.
struct Choice {
  bool lt = false;
  cublasLtMatmulAlgo_t algo{};
};

// The cuBLASLt form of one product shape: its descriptors (owned) and algorithm.
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool lt = false;  // false: cuBLAS's choice (cublasGemmEx)
  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};

cudaDataType_t in_type(Dtype dtype) { return dtype == Dtype::kF16 ? CUDA_R_16F : CUDA_R_16BF; }

// The descriptors of a product of m rows, as cublasGemmEx is called: column-major
// yᵀ[n][m] = wᵀ · xᵀ with w stored k × n (transposed).
Status describe(const Signature& sig, int64_t m, LtPlan* plan) {
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  PD_RETURN_IF_ERROR(from_cublas(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                                 "cublasLtMatmulDescCreate"));
  PD_RETURN_IF_ERROR(from_cublas(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "transa"));
  PD_RETURN_IF_ERROR(from_cublas(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "transb"));
  const cudaDataType_t in = in_type(sig.dtype), out = sig.f32_out ? CUDA_R_32F : in;
  PD_RETURN_IF_ERROR(from_cublas(cublasLtMatrixLayoutCreate(&plan->a, in, static_cast<uint64_t>(sig.k),
                                                            static_cast<uint64_t>(sig.n), sig.k),
                                 "cublasLtMatrixLayoutCreate"));
  PD_RETURN_IF_ERROR(from_cublas(cublasLtMatrixLayoutCreate(&plan->b, in, static_cast<uint64_t>(sig.k),
                                                            static_cast<uint64_t>(m), sig.ldx),
                                 "cublasLtMatrixLayoutCreate"));
  return from_cublas(cublasLtMatrixLayoutCreate(&plan->c, out, static_cast<uint64_t>(sig.n),
                                                static_cast<uint64_t>(m), sig.ldy),
                     "cublasLtMatrixLayoutCreate");
}

// A CUDA runtime error as a Status.
Status from_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return ok_status();
  return internal_error(fmt::format("{}: {}", what, cudaGetErrorString(e)));
}

}  // namespace

struct Blas::State {
  cublasHandle_t handle = nullptr;
  cublasLtHandle_t lt = nullptr;
  DeviceBuffer workspace;
  bool tuning = false;
  double min_gain = 0.03;
  std::map<std::pair<Signature, int64_t>, Choice> tuned;                   // by bucket
  std::map<std::pair<Signature, int64_t>, std::unique_ptr<LtPlan>> plans;  // by row count
  int64_t lt_plans = 0;
  ~State() {
    plans.clear();
    if (lt != nullptr) cublasLtDestroy(lt);
    if (handle != nullptr) cublasDestroy(handle);
  }

  // One product with `plan` (nullptr or a plan of cuBLAS's choice: cublasGemmEx).
  Status launch(const LtPlan* plan, const uint16_t* x, const uint16_t* w, int64_t m, void* y,
                StreamHandle stream, const Signature& sig);
  // The plan of a product of m rows: nullptr where its bucket has no choice yet (cuBLAS's), after
  // tuning it where tuning is on and the stream is not being captured.
  StatusOr<const LtPlan*> plan_for(const Signature& sig, int64_t m, const uint16_t* x, const uint16_t* w,
                                   StreamHandle stream);
  // Times cuBLAS's choice and cuBLASLt's candidates on these operands (into a scratch output).
  StatusOr<Choice> tune(const Signature& sig, int64_t m, const uint16_t* x, const uint16_t* w,
                        StreamHandle stream);
};

Blas::Blas(std::unique_ptr<State> state) : state_(std::move(state)) {}
Blas::Blas(Blas&&) noexcept = default;
Blas& Blas::operator=(Blas&&) noexcept = default;
Blas::~Blas() = default;

StatusOr<Blas> Blas::create() {
  auto state = std::make_unique<State>();
  PD_RETURN_IF_ERROR(from_cublas(cublasCreate(&state->handle), "cublasCreate"));
  auto workspace = DeviceBuffer::allocate(kWorkspaceBytes);
  if (!workspace.ok()) return workspace.status();
  state->workspace = std::move(*workspace);
  PD_RETURN_IF_ERROR(from_cublas(cublasSetWorkspace(state->handle, state->workspace.data(), kWorkspaceBytes),
                                 "cublasSetWorkspace"));
  PD_RETURN_IF_ERROR(from_cublas(cublasLtCreate(&state->lt), "cublasLtCreate"));
  return Blas(std::move(state));
}

namespace {
// On unless PDSERVE_CUDA_TUNE_PRODUCTS is 0, off, false or no.
bool product_tuning_from_environment() {
  const char* v = std::getenv("PDSERVE_CUDA_TUNE_PRODUCTS");
  return v == nullptr || (std::strcmp(v, "0") != 0 && std::strcmp(v, "off") != 0 &&
                          std::strcmp(v, "false") != 0 && std::strcmp(v, "no") != 0);
}
std::atomic<bool> g_product_tuning{product_tuning_from_environment()};
}  // namespace

void set_product_tuning(bool on) { g_product_tuning.store(on, std::memory_order_relaxed); }

bool product_tuning() { return g_product_tuning.load(std::memory_order_relaxed); }

void Blas::set_tuning(bool on, double min_gain) {
  state_->tuning = on;
  state_->min_gain = min_gain;
}

int64_t Blas::tuning_bucket(int64_t m) {
  if (m <= 2) return m;
  const auto p = static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(m)));
  return m >= p + p / 2 ? p + p / 2 : p;
}

int64_t Blas::tuned_buckets() const { return static_cast<int64_t>(state_->tuned.size()); }

int64_t Blas::lt_plans() const { return state_->lt_plans; }

Status Blas::matmul(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, uint16_t* y,
                    StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  return run(x, w, m, n, k, y, false, false, stream, ldx, ldy, dtype);
}

Status Blas::matmul_f32(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                        StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  return run(x, w, m, n, k, y, true, false, stream, ldx, ldy, dtype);
}

Status Blas::matmul_f32_add(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                            StreamHandle stream, Dtype dtype) {
  return run(x, w, m, n, k, y, true, true, stream, 0, 0, dtype);
}

Status Blas::run(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, void* y, bool f32_out,
                 bool accumulate, StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  if (m == 0 || n == 0) return ok_status();
  if (ldx == 0) ldx = k;
  if (ldy == 0) ldy = n;
  if (m < 0 || n < 0 || k <= 0 || ldx < k || ldy < n || m > INT_MAX || n > INT_MAX || k > INT_MAX ||
      ldx > INT_MAX || ldy > INT_MAX)
    return invalid_argument(fmt::format("matmul: bad shape m={} n={} k={} ldx={} ldy={}", m, n, k, ldx, ldy));
  PD_RETURN_IF_ERROR(from_cublas(cublasSetStream(state_->handle, stream), "cublasSetStream"));
  const Signature sig{n, k, ldx, ldy, f32_out, accumulate, dtype, common_alignment(x, w, y)};
  const LtPlan* plan = nullptr;
  if (m <= kTuneMaxRows) {
    PD_ASSIGN_OR_RETURN(plan, state_->plan_for(sig, m, x, w, stream));
  }
  return state_->launch(plan, x, w, m, y, stream, sig);
}

Status Blas::State::launch(const LtPlan* plan, const uint16_t* x, const uint16_t* w, int64_t m, void* y,
                           StreamHandle stream, const Signature& sig) {
  const float alpha = 1.0f;
  const float beta = sig.accumulate ? 1.0f : 0.0f;
  if (plan != nullptr && plan->lt)
    return from_cublas(cublasLtMatmul(lt, plan->desc, &alpha, w, plan->a, x, plan->b, &beta, y, plan->c, y,
                                      plan->c, &plan->algo, workspace.data(), kWorkspaceBytes, stream),
                       "cublasLtMatmul");
  // cuBLAS is column-major: a row-major y[m][n] is yᵀ[n][m] column-major, and
  // yᵀ = w · xᵀ, with w (k×n column-major = w[n][k] row-major) transposed.
  const cudaDataType_t in = in_type(sig.dtype);
  return from_cublas(
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(sig.n), static_cast<int>(m),
                   static_cast<int>(sig.k), &alpha, w, in, static_cast<int>(sig.k), x, in,
                   static_cast<int>(sig.ldx), &beta, y, sig.f32_out ? CUDA_R_32F : in,
                   static_cast<int>(sig.ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

StatusOr<const LtPlan*> Blas::State::plan_for(const Signature& sig, int64_t m, const uint16_t* x,
                                              const uint16_t* w, StreamHandle stream) {
  auto found = plans.find({sig, m});
  if (found != plans.end()) return static_cast<const LtPlan*>(found->second.get());
  const int64_t bucket = Blas::tuning_bucket(m);
  auto choice = tuned.find({sig, bucket});
  if (choice == tuned.end()) {
    // Not tuned: cuBLAS's choice, unless tuning is on and the stream is not being captured (a
    // tuning waits for its timings).
    if (!tuning) return static_cast<const LtPlan*>(nullptr);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PD_RETURN_IF_ERROR(from_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing"));
    if (capture != cudaStreamCaptureStatusNone) return static_cast<const LtPlan*>(nullptr);
    StatusOr<Choice> timed = tune(sig, m, x, w, stream);
    if (!timed.ok()) {
      PD_LOG_WARN("matmul {}x{}x{}: tuning its algorithm failed, cuBLAS's choice kept: {}", m, sig.n, sig.k,
                  timed.status().message());
      timed = Choice{};
    }
    choice = tuned.emplace(std::make_pair(sig, bucket), *timed).first;
  }
  auto plan = std::make_unique<LtPlan>();
  // (Descriptors that cannot be made leave this row count on cuBLAS's choice.)
  if (choice->second.lt && describe(sig, m, plan.get()).ok()) {
    plan->algo = choice->second.algo;
    cublasLtMatmulHeuristicResult_t check{};
    // The bucket's algorithm, where it is valid for this row count.
    plan->lt = cublasLtMatmulAlgoCheck(lt, plan->desc, plan->a, plan->b, plan->c, plan->c, &plan->algo,
                                       &check) == CUBLAS_STATUS_SUCCESS &&
               check.workspaceSize <= kWorkspaceBytes;
  }
  lt_plans += plan->lt ? 1 : 0;
  const LtPlan* p = plan.get();
  plans.emplace(std::make_pair(sig, m), std::move(plan));
  return p;
}

StatusOr<Choice> Blas::State::tune(const Signature& sig, int64_t m, const uint16_t* x, const uint16_t* w,
                                   StreamHandle stream) {
  const size_t out_bytes = static_cast<size_t>(m * sig.ldy) * (sig.f32_out ? 4 : 2);
  if (out_bytes > kTuneScratchBytes) return Choice{};
  LtPlan probe;
  PD_RETURN_IF_ERROR(describe(sig, m, &probe));
  // The heuristic's candidates: within the workspace, for pointers aligned as these are, and
  // reducing split sums in float (never in a 16-bit output's format).
  cublasLtMatmulPreference_t pref = nullptr;
  PD_RETURN_IF_ERROR(from_cublas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"));
  const size_t max_workspace = kWorkspaceBytes;
  const uint32_t reduction =
      CUBLASLT_REDUCTION_SCHEME_MASK & ~uint32_t{CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE};
  std::array<cublasLtMatmulHeuristicResult_t, kTuneCandidates> results{};
  int found = 0;
  cublasStatus_t heuristic = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace));
  if (heuristic == CUBLAS_STATUS_SUCCESS)
    heuristic = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                     &reduction, sizeof(reduction));
  for (const cublasLtMatmulPreferenceAttributes_t a :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (heuristic == CUBLAS_STATUS_SUCCESS)
      heuristic = cublasLtMatmulPreferenceSetAttribute(pref, a, &sig.align, sizeof(sig.align));
  if (heuristic == CUBLAS_STATUS_SUCCESS)
    heuristic = cublasLtMatmulAlgoGetHeuristic(lt, probe.desc, probe.a, probe.b, probe.c, probe.c, pref,
                                               kTuneCandidates, results.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  PD_RETURN_IF_ERROR(from_cublas(heuristic, "cublasLtMatmulAlgoGetHeuristic"));
  if (found == 0) return Choice{};

  // Candidate 0 is cuBLAS's choice; then cuBLASLt's. Each is timed over 3 calls after one, in two
  // rounds (the candidates in turn), keeping its faster round. Before each timed call a buffer twice
  // the size of L2 is written, so that the weights come from memory as in a forward pass, where a
  // layer's weights are never in L2 when its product starts (without that buffer there is no tuning:
  // warm weights would favour other algorithms).
  int device = 0, l2_bytes = 0;
  PD_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&device), "cudaGetDevice"));
  PD_RETURN_IF_ERROR(
      from_cuda(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute"));
  PD_ASSIGN_OR_RETURN(DeviceBuffer scratch, DeviceBuffer::allocate(out_bytes));
  PD_ASSIGN_OR_RETURN(DeviceBuffer flush,
                      DeviceBuffer::allocate(2 * static_cast<size_t>(std::max(l2_bytes, 1))));
  // Whatever happens below, the work queued on the stream ends before these buffers are freed.
  struct SyncOnExit {
    StreamHandle stream;
    ~SyncOnExit() { (void)cudaStreamSynchronize(stream); }
  } sync_on_exit{stream};
  PD_RETURN_IF_ERROR(fill_bytes(scratch.data(), 0, out_bytes, stream));
  const int candidates = 1 + found;
  std::vector<float> best_ms(static_cast<size_t>(candidates), -1.0f);
  constexpr int kTimed = 3;
  std::array<cudaEvent_t, 2 * kTimed> events{};
  Status made = ok_status();
  for (cudaEvent_t& e : events)
    if (made.ok()) made = from_cuda(cudaEventCreate(&e), "cudaEventCreate");
  auto destroy_events = [&] {
    for (cudaEvent_t e : events)
      if (e != nullptr) cudaEventDestroy(e);
  };
  if (!made.ok()) {
    destroy_events();
    return made;
  }
  // Candidate c through launch(): 0 on cuBLAS's choice, the others as `probe` with their algorithm.
  auto run_candidate = [&](int c) -> Status {
    probe.lt = c > 0;
    if (c > 0) probe.algo = results[static_cast<size_t>(c - 1)].algo;
    return launch(&probe, x, w, m, scratch.data(), stream, sig);
  };
  Status timing = ok_status();
  for (int round = 0; round < 2 && timing.ok(); ++round) {
    for (int c = 0; c < candidates && timing.ok(); ++c) {
      if (c > 0 && (results[static_cast<size_t>(c - 1)].state != CUBLAS_STATUS_SUCCESS ||
                    best_ms[static_cast<size_t>(c)] == -2.0f))
        continue;
      Status ran = run_candidate(c);
      for (int i = 0; i < kTimed && ran.ok(); ++i) {
        ran = fill_bytes(flush.data(), static_cast<uint8_t>(i), flush.bytes(), stream);
        if (ran.ok())
          ran = from_cuda(cudaEventRecord(events[static_cast<size_t>(2 * i)], stream), "cudaEventRecord");
        if (ran.ok()) ran = run_candidate(c);
        if (ran.ok())
          ran = from_cuda(cudaEventRecord(events[static_cast<size_t>(2 * i + 1)], stream), "cudaEventRecord");
      }
      if (ran.ok())
        ran = from_cuda(cudaEventSynchronize(events[static_cast<size_t>(2 * kTimed - 1)]),
                        "cudaEventSynchronize");
      float ms = 0;
      for (int i = 0; i < kTimed && ran.ok(); ++i) {
        float one = 0;
        ran = from_cuda(cudaEventElapsedTime(&one, events[static_cast<size_t>(2 * i)],
                                             events[static_cast<size_t>(2 * i + 1)]),
                        "cudaEventElapsedTime");
        ms += one;
      }
      if (!ran.ok()) {
        if (c == 0) timing = ran;  // cuBLAS's own choice failing is an error; a candidate is dropped
        best_ms[static_cast<size_t>(c)] = -2.0f;
        (void)cudaGetLastError();
        continue;
      }
      float& best = best_ms[static_cast<size_t>(c)];
      best = best < 0 ? ms : std::min(best, ms);
    }
  }
  destroy_events();
  PD_RETURN_IF_ERROR(timing);
  int pick = 0;
  for (int c = 1; c < candidates; ++c)
    if (best_ms[static_cast<size_t>(c)] >= 0 &&
        (pick == 0 || best_ms[static_cast<size_t>(c)] < best_ms[static_cast<size_t>(pick)]))
      pick = c;
  Choice choice;
  if (pick > 0 && best_ms[static_cast<size_t>(pick)] <= (1.0 - min_gain) * best_ms[0]) {
    choice.lt = true;
    choice.algo = results[static_cast<size_t>(pick - 1)].algo;
  }
  PD_LOG_DEBUG(
      "matmul {}x{}x{} (and the other row counts of its bucket): cuBLAS's choice {:.1f} us, the fastest of "
      "cuBLASLt's {} candidates {:.1f} us; taken: {}",
      m, sig.n, sig.k, best_ms[0] * 1e3 / kTimed, found,
      pick > 0 ? best_ms[static_cast<size_t>(pick)] * 1e3 / kTimed : 0.0,
      choice.lt ? "cuBLASLt's" : "cuBLAS's");
  return choice;
}

}  // namespace pdserve::cuda
