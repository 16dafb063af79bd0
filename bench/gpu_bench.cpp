// pdserve_gpu_bench: the GPU's own ceilings, then our CUDA kernels against them
// (docs/perf/gpu.md). Every figure is the median of repeated runs timed with CUDA events.
//
//   pdserve_gpu_bench [--json PATH] [--quick] [--model NAME | --no-model] [--no-programmatic-launch]
//                     [--prefill-attention-mma] ...  (--help lists them all)
//
// Ceilings: a large device-to-device copy (bytes read + written per second), a large bf16 matrix
// product (FLOP/s, random data), and a 1 GiB peer copy each way between GPUs 0 and 1 where there
// are two. Kernels: decode attention with Llama-3.1-8B's heads (32 query, 8 kv, head_dim 128,
// 16-token blocks) at batch 1, 16, 64 and contexts 1k, 4k, as a fraction of the copy bandwidth
// (the bytes it must read: the whole KV of the batch, one layer); prefill attention alone, one
// layer of 1 × 4096 and 8 × 512 tokens, against the FLOP floor. Model (default
// synthetic:llama-3.1-8b): a whole decode step (greedy token chosen on the GPU) at batch 1, 16,
// 64 and contexts 1k, 4k against the memory floor (weights + the batch's KV read once at the copy
// bandwidth), and prefill of 1 × 4096 and 8 × 512 tokens against the FLOP floor (2 · parameters ·
// tokens plus causal attention, at the measured matrix rate). Host-staged KV: one request's KV
// through a shm and a tcp send pool, page-locked and pageable, on GPU 0. Sampling: a token drawn from 128256
// logits a row on the GPU (greedy, tempered, top-k / top-p / min-p) against the logits' copy to
// the host that a draw made there needs first.
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/log.h"
#include "gpu_products.h"
#include "kernel_timeline.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/gemv_tuning.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "model/cuda_model.h"
#include "transfer/cuda_transports.h"
#include "transfer/kv_transport.h"
#include "transfer/kv_wire.h"

namespace {

using namespace pdserve;
using namespace pdserve::cuda;

[[noreturn]] void die(const Status& s, const char* what) {
  std::fprintf(stderr, "pdserve_gpu_bench: %s: %s\n", what, s.to_string().c_str());
  std::exit(1);
}
#define CHECK_OK(expr)              \
  do {                              \
    ::pdserve::Status st_ = (expr); \
    if (!st_.ok()) die(st_, #expr); \
  } while (0)

template <typename T>
T value_or_die(StatusOr<T> v, const char* what) {
  if (!v.ok()) die(v.status(), what);
  return std::move(*v);
}

// Median milliseconds of `reps` timed runs of `work` (after `warmup` untimed ones) on `stream`.
double median_ms(int warmup, int reps, StreamHandle stream, const std::function<void()>& work) {
  for (int i = 0; i < warmup; ++i) work();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    Event start = value_or_die(Event::create(), "event");
    Event stop = value_or_die(Event::create(), "event");
    CHECK_OK(start.record(stream));
    work();
    CHECK_OK(stop.record(stream));
    ms.push_back(value_or_die(Event::elapsed_ms(start, stop), "elapsed"));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// n bf16 values, uniform in [-scale, scale], made on the GPU (cuda::fill_uniform_bf16).
DeviceBuffer random_values(size_t n, float scale, uint64_t seed, Dtype dtype = Dtype::kBf16) {
  DeviceBuffer b = value_or_die(DeviceBuffer::allocate(n * 2), "allocate");
  CHECK_OK(fill_uniform(b.as<uint16_t>(), static_cast<int64_t>(n), 0.0f, scale, seed, dtype, nullptr));
  CHECK_OK(synchronize());
  return b;
}

struct Json {
  std::vector<std::string> fields;
  void add(const std::string& key, double v) { fields.push_back(fmt::format("\"{}\": {:.6g}", key, v)); }
  void add(const std::string& key, const std::string& v) {
    fields.push_back(fmt::format("\"{}\": \"{}\"", key, v));
  }
  void add_raw(const std::string& key, const std::string& raw) {
    fields.push_back(fmt::format("\"{}\": {}", key, raw));
  }
  std::string str() const {
    std::string s = "{";
    for (size_t i = 0; i < fields.size(); ++i) s += (i ? ", " : "") + fields[i];
    return s + "}";
  }
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Median wall time of `reps` synchronous calls (each returns when its result is on the host).
double median_wall_ms(int warmup, int reps, const std::function<void()>& work) {
  for (int i = 0; i < warmup; ++i) work();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_ms();
    work();
    ms.push_back(now_ms() - t0);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// The batch sizes of the model's decode steps (--decode-batches) and their contexts (--decode-contexts).
std::vector<int32_t> g_decode_batches = {1, 16, 64};
std::vector<int32_t> g_decode_contexts = {1024, 4096};

// Sizes 1 to `max` separated by commas into *out, or false having said why.
bool parse_sizes(const char* flag, const char* what, const char* text, long max, std::vector<int32_t>* out) {
  out->clear();
  for (const char* p = text; *p != '\0';) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    if (end == p || v < 1 || v > max || (*end != ',' && *end != '\0')) {
      std::fprintf(stderr, "%s: expected %s 1 to %ld separated by commas, got '%s'\n", flag, what, max, text);
      return false;
    }
    out->push_back(static_cast<int32_t>(v));
    p = *end == ',' ? end + 1 : end;
  }
  if (out->empty()) {
    std::fprintf(stderr, "%s: expected %s 1 to %ld separated by commas, got nothing\n", flag, what, max);
    return false;
  }
  return true;
}

// The models' number format (--dtype).
cuda::Dtype g_dtype = cuda::Dtype::kBf16;

// Model options with the bench's number format.
CudaModelOptions model_options(int32_t num_blocks, int32_t block_size, bool cuda_graphs = true) {
  CudaModelOptions o{0, num_blocks, block_size, cuda_graphs};
  o.dtype = g_dtype;
  return o;
}

std::string model_section(const std::string& name, bool quick, bool with_decode, bool with_prefill,
                          double copy_gbps, double gemm_tflops) {
  const int reps = quick ? 3 : 10;
  const int32_t bs = 16;
  struct DecodeCase {
    int32_t batch, ctx;
  };
  std::vector<DecodeCase> decode_cases;
  for (int32_t batch : g_decode_batches)
    for (int32_t ctx : g_decode_contexts)
      if (with_decode && (!quick || batch * ctx <= 16 * 1024)) decode_cases.push_back({batch, ctx});
  int32_t max_blocks = 0;
  for (const DecodeCase& c : decode_cases) max_blocks = std::max(max_blocks, c.batch * (c.ctx / bs + 1));
  max_blocks = std::max(max_blocks, 4096 / bs + 8 * (512 / bs));
  std::unique_ptr<CudaLlamaModel> m =
      value_or_die(CudaLlamaModel::synthetic(name, model_options(max_blocks, bs), 1234), "synthetic model");
  const ModelConfig& c = m->config();
  // What a decoding instance does at start, for the largest batch here (before the KV is made: it
  // writes some).
  double tune_s = 0.0;
  int32_t max_batch = 0;
  for (const DecodeCase& dc : decode_cases) max_batch = std::max(max_batch, dc.batch);
  if (max_batch > 0 && product_tuning()) {
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_OK(m->tune_decode_steps(max_batch));
    tune_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("decode steps' products tuned at load for 1 to %d sequences (%lld sizes) in %.2f s\n",
                max_batch, static_cast<long long>(m->tuned_decode_buckets()), tune_s);
  }
  CHECK_OK(m->randomize_kv(99));
  std::printf("model %s: %.2f GB of %s weights, %zu KiB of KV per token, KV cache %d blocks of %d tokens\n",
              name.c_str(), m->weight_bytes() / 1e9, cuda::dtype_name(m->dtype()),
              m->kv_bytes_per_token() / 1024, max_blocks, bs);
  std::string rows = "{\"name\": \"" + name + "\", \"dtype\": \"" + cuda::dtype_name(m->dtype()) +
                     "\", \"weight_bytes\": " + std::to_string(m->weight_bytes()) +
                     ", \"tune_decode_steps_s\": " + std::to_string(tune_s) + ", \"decode\": [";

  // The parameters of the layers' matrix products (2 FLOP each a token).
  const int64_t layer_params =
      int64_t{c.num_layers} * (int64_t{c.q_dim() + 2 * c.kv_dim()} * c.hidden_size +
                               int64_t{c.hidden_size} * c.q_dim() + 3 * int64_t{c.ffn_size} * c.hidden_size);

  // Decode: `batch` sequences of `ctx` cached tokens (random KV) each take one more token.
  for (size_t i = 0; i < decode_cases.size(); ++i) {
    const DecodeCase& dc = decode_cases[i];
    const int32_t per_seq = dc.ctx / bs + 1;
    std::vector<std::vector<int32_t>> tables(dc.batch);
    for (int32_t s = 0; s < dc.batch; ++s) {
      tables[s].resize(per_seq);
      std::iota(tables[s].begin(), tables[s].end(), s * per_seq);
    }
    std::vector<int32_t> tokens(dc.batch, 42), next(dc.batch);
    ForwardBatch b;
    b.tokens = tokens;
    for (int32_t s = 0; s < dc.batch; ++s) b.chunks.push_back({dc.ctx, 1, tables[s], true});
    m->set_cuda_graphs(false);
    const double eager_ms = median_wall_ms(2, reps, [&] { CHECK_OK(m->forward_argmax(b, next.data())); });
    m->set_cuda_graphs(true);
    const double ms = median_wall_ms(2, reps, [&] { CHECK_OK(m->forward_argmax(b, next.data())); });
    const double bytes =
        static_cast<double>(m->weight_bytes()) +
        static_cast<double>(dc.batch) * (dc.ctx + 1) * static_cast<double>(m->kv_bytes_per_token());
    const double floor_ms = bytes / (copy_gbps * 1e9) * 1e3;
    // What the step's arithmetic alone would take at the measured matrix rate: the products, the LM
    // head and the attention (q·k and p·v over ctx + 1 keys). It grows with the batch; above a few
    // hundred sequences the products' part exceeds the weights' read.
    const double flops = static_cast<double>(dc.batch) *
                         (2.0 * static_cast<double>(layer_params) + 2.0 * c.vocab_size * c.hidden_size +
                          4.0 * c.num_layers * (dc.ctx + 1.0) * c.q_dim());
    const double flop_floor_ms = flops / (gemm_tflops * 1e12) * 1e3;
    std::printf(
        "decode step batch %2d ctx %4d: %.3f ms (%.3f ms launched one by one), floor %.3f ms, %.0f%% of "
        "floor, %.0f tokens/s; the matrix rate alone %.3f ms\n",
        dc.batch, dc.ctx, ms, eager_ms, floor_ms, 100.0 * floor_ms / ms, dc.batch / (ms * 1e-3),
        flop_floor_ms);
    Json row;
    row.add("batch", dc.batch);
    row.add("ctx", dc.ctx);
    row.add("ms", ms);
    row.add("eager_ms", eager_ms);
    row.add("floor_ms", floor_ms);
    row.add("flop_floor_ms", flop_floor_ms);
    rows += (i ? ", " : "") + row.str();
  }
  rows += "], \"prefill\": [";

  // Prefill: `seqs` prompts of `len` tokens from an empty cache, logits of each last token.
  struct PrefillCase {
    int32_t seqs, len;
  };
  std::vector<PrefillCase> prefill_cases = {{1, 4096}, {8, 512}};
  if (quick) prefill_cases = {{1, 1024}};
  if (!with_prefill) prefill_cases.clear();
  for (size_t i = 0; i < prefill_cases.size(); ++i) {
    const PrefillCase& pc = prefill_cases[i];
    const int32_t per_seq = pc.len / bs + 1;
    std::vector<std::vector<int32_t>> tables(pc.seqs);
    std::vector<int32_t> tokens;
    ForwardBatch b;
    for (int32_t s = 0; s < pc.seqs; ++s) {
      tables[s].resize(per_seq);
      std::iota(tables[s].begin(), tables[s].end(), s * per_seq);
      for (int32_t t = 0; t < pc.len; ++t) tokens.push_back((s * 7919 + t * 31) % c.vocab_size);
    }
    b.tokens = tokens;
    for (int32_t s = 0; s < pc.seqs; ++s) b.chunks.push_back({0, pc.len, tables[s], true});
    std::vector<int32_t> next(pc.seqs);
    const double ms = median_wall_ms(1, quick ? 2 : 5, [&] { CHECK_OK(m->forward_argmax(b, next.data())); });
    const double tokens_total = static_cast<double>(pc.seqs) * pc.len;
    const double attention_flops =
        static_cast<double>(c.num_layers) * pc.seqs * 2.0 * pc.len * (pc.len + 1.0) * c.q_dim();
    const double flops = 2.0 * static_cast<double>(layer_params) * tokens_total +
                         2.0 * c.vocab_size * static_cast<double>(c.hidden_size) * pc.seqs + attention_flops;
    const double floor_ms = flops / (gemm_tflops * 1e12) * 1e3;
    std::printf("prefill %d x %d tokens: %.2f ms, floor %.2f ms (%.1f TFLOP), %.0f%% of the matrix rate\n",
                pc.seqs, pc.len, ms, floor_ms, flops / 1e12, 100.0 * floor_ms / ms);
    Json row;
    row.add("seqs", pc.seqs);
    row.add("len", pc.len);
    row.add("ms", ms);
    row.add("floor_ms", floor_ms);
    rows += (i ? ", " : "") + row.str();
  }
  return rows + "]}";
}

int write_json(const std::string& path, const Json& out) {
  if (path.empty()) return 0;
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "pdserve_gpu_bench: cannot write %s\n", path.c_str());
    return 1;
  }
  std::fprintf(f, "%s\n", out.str().c_str());
  std::fclose(f);
  return 0;
}

// The median of `reps` timings by `time_one` (milliseconds), each after 100 ms of idle GPUs.
double median_after_idle(int reps, const std::function<double()>& time_one) {
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK_OK(synchronize());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ms.push_back(time_one());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
// Median milliseconds of `work` on `stream` (CUDA events), each run after 100 ms of idle GPUs.
double median_after_idle_ms(int reps, StreamHandle stream, const std::function<void()>& work) {
  return median_after_idle(reps, [&] { return median_ms(0, 1, stream, work); });
}

// Set in the environment of the sender process cross_process_section starts ("quick" or "full").
constexpr const char* kSenderChildEnv = "PDSERVE_GPU_BENCH_KV_SENDER";

// The KV that transfer_section and cross_process_section move: one request of Llama-3.1-8B's
// shape (32 layers × 8 kv heads × 128), 4096 tokens (1024 quick) in 16-token blocks, each side
// with its own shuffled block table in a pool of 44 more blocks.
struct TransferGeometry {
  PagedKvCache geo;  // base unset
  int32_t tokens = 0, used = 0, pool = 0;
  std::vector<int32_t> table0, table1;  // sender's, receiver's
  size_t cache_bytes = 0, wire_bytes = 0;
  KvLayout layout;

  explicit TransferGeometry(bool quick) {
    geo.num_layers = 32;
    geo.block_size = 16;
    geo.num_kv_heads = 8;
    geo.head_dim = 128;
    tokens = quick ? 1024 : 4096;
    used = tokens / geo.block_size;
    pool = used + 44;
    geo.layer_stride = 2 * int64_t{pool} * geo.block_size * geo.row_values();
    geo.v_offset = geo.layer_stride / 2;
    cache_bytes = static_cast<size_t>(geo.layer_stride * geo.num_layers * 2);
    wire_bytes = static_cast<size_t>(geo.bytes(tokens));
    table0.resize(static_cast<size_t>(pool));
    std::iota(table0.begin(), table0.end(), 0);
    table1 = table0;
    std::shuffle(table0.begin(), table0.end(), std::mt19937(1));
    std::shuffle(table1.begin(), table1.end(), std::mt19937(2));
    table0.resize(static_cast<size_t>(used));
    table1.resize(static_cast<size_t>(used));
    layout = KvLayout{0x5eedULL, KvDtype::kBF16, geo.num_layers, geo.num_kv_heads * geo.head_dim};
  }
  // The sender's cache, on the current device: uniform values from seed 5.
  DeviceBuffer sender_cache(StreamHandle s) const {
    DeviceBuffer c = value_or_die(DeviceBuffer::allocate(cache_bytes), "allocate");
    CHECK_OK(fill_uniform_bf16(c.as<uint16_t>(), static_cast<int64_t>(cache_bytes / 2), 0, 1, 5, s));
    return c;
  }
  PagedKvCache kernel(const DeviceBuffer& memory) const {
    PagedKvCache c = geo;
    c.base = memory.as<uint16_t>();
    return c;
  }
  PagedKvView view(const DeviceBuffer& memory, int device) const {
    PagedKvView v;
    v.base = memory.as<uint8_t>();
    v.block_bytes = static_cast<size_t>(geo.block_size * geo.row_values() * 2);
    v.num_blocks = pool;
    v.block_size = geo.block_size;
    v.layout = layout;
    v.memory = KvMemory::kCuda;
    v.cuda_device = device;
    v.num_kv_heads = geo.num_kv_heads;
    v.layer_bytes = static_cast<uint64_t>(geo.layer_stride * 2);
    v.v_offset_bytes = static_cast<uint64_t>(geo.v_offset * 2);
    return v;
  }
  KvTransportOptions send_options() const {
    KvTransportOptions o;
    o.receive = false;
    o.cuda_device = 0;
    o.max_buffers = 2;
    o.pool_capacity_bytes = kv_send_buffer_bytes(kv_message_bytes(layout, tokens));
    return o;
  }
};

DeviceBuffer upload_table(const std::vector<int32_t>& table) {
  DeviceBuffer d = value_or_die(DeviceBuffer::allocate(table.size() * 4), "allocate");
  CHECK_OK(copy_to_device(d.data(), table.data(), table.size() * 4));
  return d;
}

// One request's KV from GPU 0 to GPU 1: Llama-3.1-8B's 32 layers × 8 kv heads × 128, 4096 tokens
// (512 MiB) in 16-token blocks, each side its own shuffled block table. Times, as a share of the
// measured cudaMemcpyPeer bandwidth: the sender's gather into its contiguous buffer; the
// receiver's RecvScatter kernel reading that buffer over the link (what CUDA IPC gives a process);
// a peer copy into a local buffer then a local scatter; and the block-fixed baseline, one copy and
// one confirmation (the sender waits for it) per block and layer, K and V. Checks the bytes.
std::string transfer_section(double peer_gbps, bool quick) {
  const int reps = quick ? 3 : 7;
  const TransferGeometry g(quick);
  const PagedKvCache& geo = g.geo;
  const int64_t tokens = g.tokens;
  const int32_t used = g.used;
  const size_t cache_bytes = g.cache_bytes, wire_bytes = g.wire_bytes;
  const std::vector<int32_t>&table0 = g.table0, &table1 = g.table1;

  CHECK_OK(set_device(0));
  Stream s0 = value_or_die(Stream::create(), "stream");
  DeviceBuffer cache0 = g.sender_cache(s0.get());
  DeviceBuffer wire0 = value_or_die(DeviceBuffer::allocate(wire_bytes), "allocate");
  DeviceBuffer dtable0 = upload_table(table0);
  const PagedKvCache c0 = g.kernel(cache0);

  CHECK_OK(set_device(1));
  Stream s1 = value_or_die(Stream::create(), "stream");
  DeviceBuffer cache1 = value_or_die(DeviceBuffer::allocate(cache_bytes), "allocate");
  DeviceBuffer staging1 = value_or_die(DeviceBuffer::allocate(wire_bytes), "allocate");
  DeviceBuffer dtable1 = upload_table(table1);
  const PagedKvCache c1 = g.kernel(cache1);

  // Verifies a cache of GPU 1 against the sender's wire buffer (gathered back on GPU 1); verify(),
  // c1's.
  auto verify_cache = [&](const char* what, const PagedKvCache& cache, const int32_t* table) {
    CHECK_OK(set_device(1));
    CHECK_OK(fill_bytes(staging1.data(), 0, wire_bytes, s1.get()));
    CHECK_OK(gather_kv(cache, table, tokens, staging1.as<uint16_t>(), s1.get()));
    CHECK_OK(s1.synchronize());
    std::vector<uint8_t> want(wire_bytes), got(wire_bytes);
    CHECK_OK(copy_to_host(want.data(), wire0.data(), wire_bytes));
    CHECK_OK(copy_to_host(got.data(), staging1.data(), wire_bytes));
    if (want != got) {
      std::fprintf(stderr, "pdserve_gpu_bench: %s delivered wrong KV bytes\n", what);
      std::exit(1);
    }
  };
  auto verify = [&](const char* what) { verify_cache(what, c1, dtable1.as<int32_t>()); };

  CHECK_OK(set_device(0));
  const double gather_ms = median_ms(2, reps, s0.get(), [&] {
    CHECK_OK(gather_kv(c0, dtable0.as<int32_t>(), tokens, wire0.as<uint16_t>(), s0.get()));
  });
  CHECK_OK(s0.synchronize());

  CHECK_OK(set_device(1));
  CHECK_OK(fill_bytes(cache1.data(), 0, cache_bytes, s1.get()));
  const double direct_ms = median_ms(2, reps, s1.get(), [&] {
    CHECK_OK(scatter_kv(wire0.as<uint16_t>(), c1, dtable1.as<int32_t>(), tokens, s1.get()));
  });
  verify("RecvScatter over the link");

  // The same from a body 64 bytes past a 4 KiB boundary: where a send pool's buffer puts it,
  // after the wire header.
  CHECK_OK(set_device(0));
  DeviceBuffer wire0_shifted = value_or_die(DeviceBuffer::allocate(wire_bytes + 4096), "allocate");
  const uint16_t* body64 =
      reinterpret_cast<const uint16_t*>(wire0_shifted.as<uint8_t>() + kKvWireHeaderBytes);
  CHECK_OK(
      copy_peer(wire0_shifted.as<uint8_t>() + kKvWireHeaderBytes, 0, wire0.data(), 0, wire_bytes, s0.get()));
  CHECK_OK(s0.synchronize());
  CHECK_OK(set_device(1));
  CHECK_OK(fill_bytes(cache1.data(), 0, cache_bytes, s1.get()));
  const double shifted_ms = median_ms(
      2, reps, s1.get(), [&] { CHECK_OK(scatter_kv(body64, c1, dtable1.as<int32_t>(), tokens, s1.get())); });
  verify("RecvScatter over the link, body after a header");
  wire0_shifted = DeviceBuffer();

  // The same, each after 100 ms in which neither GPU works (as between a serving decode's pulls).
  CHECK_OK(set_device(1));
  CHECK_OK(fill_bytes(cache1.data(), 0, cache_bytes, s1.get()));
  const double idle_ms = median_after_idle_ms(reps, s1.get(), [&] {
    CHECK_OK(scatter_kv(wire0.as<uint16_t>(), c1, dtable1.as<int32_t>(), tokens, s1.get()));
  });
  verify("RecvScatter over the link after idling");

  // The same into a 16 GiB cache whose blocks lie spread over it, as a serving decode's may.
  double spread_ms = 0;
  {
    CHECK_OK(set_device(1));
    PagedKvCache big = geo;
    const int32_t big_pool = static_cast<int32_t>(
        (int64_t{16} << 30) / (2 * geo.block_size * geo.row_values() * 2 * int64_t{geo.num_layers}));
    big.layer_stride = 2 * int64_t{big_pool} * geo.block_size * geo.row_values();
    big.v_offset = big.layer_stride / 2;
    DeviceBuffer cache_big = value_or_die(
        DeviceBuffer::allocate(static_cast<size_t>(big.layer_stride * geo.num_layers * 2)), "allocate");
    big.base = cache_big.as<uint16_t>();
    std::vector<int32_t> table_big(static_cast<size_t>(big_pool));
    std::iota(table_big.begin(), table_big.end(), 0);
    std::shuffle(table_big.begin(), table_big.end(), std::mt19937(3));
    table_big.resize(used);
    DeviceBuffer dtable_big = value_or_die(DeviceBuffer::allocate(table_big.size() * 4), "allocate");
    CHECK_OK(copy_to_device(dtable_big.data(), table_big.data(), table_big.size() * 4));
    spread_ms = median_ms(2, reps, s1.get(), [&] {
      CHECK_OK(scatter_kv(wire0.as<uint16_t>(), big, dtable_big.as<int32_t>(), tokens, s1.get()));
    });
    verify_cache("RecvScatter into a 16 GiB cache", big, dtable_big.as<int32_t>());
  }

  CHECK_OK(set_device(1));
  CHECK_OK(fill_bytes(cache1.data(), 0, cache_bytes, s1.get()));
  const double copy_ms = median_ms(2, reps, s1.get(), [&] {
    CHECK_OK(copy_peer(staging1.data(), 1, wire0.data(), 0, wire_bytes, s1.get()));
  });
  // The reference's own slowdown after 100 ms of idle GPUs.
  const double copy_idle_ms = median_after_idle_ms(reps, s1.get(), [&] {
    CHECK_OK(copy_peer(staging1.data(), 1, wire0.data(), 0, wire_bytes, s1.get()));
  });
  const double scatter_ms = median_ms(2, reps, s1.get(), [&] {
    CHECK_OK(scatter_kv(staging1.as<uint16_t>(), c1, dtable1.as<int32_t>(), tokens, s1.get()));
  });
  const double copy_scatter_ms = median_ms(2, reps, s1.get(), [&] {
    CHECK_OK(copy_peer(staging1.data(), 1, wire0.data(), 0, wire_bytes, s1.get()));
    CHECK_OK(scatter_kv(staging1.as<uint16_t>(), c1, dtable1.as<int32_t>(), tokens, s1.get()));
  });
  verify("peer copy + scatter");

  // Block-fixed: for each block and layer, K then V of that block (all kv heads: one contiguous
  // piece in this layout) straight from cache to cache, then the sender waits for it.
  CHECK_OK(set_device(1));
  CHECK_OK(fill_bytes(cache1.data(), 0, cache_bytes, s1.get()));
  CHECK_OK(s1.synchronize());
  const size_t piece = static_cast<size_t>(geo.block_size * geo.row_values() * 2);
  auto block_fixed = [&] {
    for (int32_t b = 0; b < used; ++b) {
      for (int32_t l = 0; l < geo.num_layers; ++l) {
        for (int kv = 0; kv < 2; ++kv) {
          const int64_t off0 = l * geo.layer_stride + kv * geo.v_offset +
                               int64_t{table0[b]} * geo.block_size * geo.row_values();
          const int64_t off1 = l * geo.layer_stride + kv * geo.v_offset +
                               int64_t{table1[b]} * geo.block_size * geo.row_values();
          CHECK_OK(copy_peer(c1.base + off1, 1, c0.base + off0, 0, piece, s1.get()));
        }
        CHECK_OK(s1.synchronize());  // the confirmation of this (block, layer)
      }
    }
  };
  const double fixed_ms = median_wall_ms(1, quick ? 2 : 3, block_fixed);
  verify("block-fixed");

  auto share = [&](double ms) { return 100.0 * wire_bytes / (ms * 1e-3) / (peer_gbps * 1e9); };
  std::printf(
      "KV transfer %zu MiB GPU0 -> GPU1 (peer copy %.0f GB/s): gather %.3f ms; RecvScatter over the link "
      "%.3f ms (%.0f%%), from a body %d bytes past a 4 KiB boundary %.3f ms (%.0f%%), into a 16 GiB cache "
      "%.3f ms (%.0f%%), after 100 ms idle %.3f ms (%.0f%%); peer copy %.3f ms (%.0f%%; after 100 ms idle "
      "%.3f ms) + scatter %.3f ms = "
      "%.3f ms together (%.0f%%); "
      "block-fixed %.2f ms (%.0f%%)\n",
      wire_bytes >> 20, peer_gbps, gather_ms, direct_ms, share(direct_ms),
      static_cast<int>(kKvWireHeaderBytes), shifted_ms, share(shifted_ms), spread_ms, share(spread_ms),
      idle_ms, share(idle_ms), copy_ms, share(copy_ms), copy_idle_ms, scatter_ms, copy_scatter_ms,
      share(copy_scatter_ms), fixed_ms, share(fixed_ms));
  Json j;
  j.add("bytes", static_cast<double>(wire_bytes));
  j.add("peer_gbps", peer_gbps);
  j.add("gather_ms", gather_ms);
  j.add("recv_scatter_ms", direct_ms);
  j.add("recv_scatter_after_header_ms", shifted_ms);
  j.add("recv_scatter_16gib_cache_ms", spread_ms);
  j.add("recv_scatter_after_idle_ms", idle_ms);
  j.add("peer_copy_ms", copy_ms);
  j.add("peer_copy_after_idle_ms", copy_idle_ms);
  j.add("local_scatter_ms", scatter_ms);
  j.add("copy_then_scatter_ms", copy_scatter_ms);
  j.add("block_fixed_ms", fixed_ms);
  CHECK_OK(set_device(0));
  return j.str();
}

std::string hex(std::span<const uint8_t> bytes) {
  std::string s;
  for (uint8_t b : bytes) s += fmt::format("{:02x}", b);
  return s;
}

// The sender process: prints the IPC handle of its gathered buffer and its pool's KV handle, one a
// line, then holds both until its standard input closes.
int kv_sender_child(bool quick) {
  const TransferGeometry g(quick);
  CHECK_OK(set_device(0));
  Stream s = value_or_die(Stream::create(), "stream");
  DeviceBuffer cache = g.sender_cache(s.get());
  DeviceBuffer table = upload_table(g.table0);
  DeviceBuffer wire = value_or_die(DeviceBuffer::allocate(g.wire_bytes), "allocate");
  CHECK_OK(gather_kv(g.kernel(cache), table.as<int32_t>(), g.tokens, wire.as<uint16_t>(), s.get()));
  CHECK_OK(s.synchronize());
  const IpcHandle raw = value_or_die(ipc_handle(wire.data()), "ipc handle");
  KvTransport t = value_or_die(make_cuda_ipc_transport(g.send_options()), "cuda-ipc transport");
  const KvHandle h = value_or_die(t.pool->publish(g.view(cache, 0), g.table0, g.tokens, 0), "publish");
  std::printf("%s\n%s\n", hex(raw).c_str(), h.to_string().c_str());
  std::fflush(stdout);
  char c = 0;
  while (read(STDIN_FILENO, &c, 1) > 0) {
  }
  return 0;
}

// What a decode's cuda-ipc pull costs once the KV crosses a process boundary, against the kernel
// alone: the geometry of transfer_section (4096 tokens of Llama-3.1-8B, 512 MiB), the sender a
// second process (this program started again with kSenderChildEnv) that owns a paged cache on
// GPU 0 filled as transfer_section's, gathers it into a buffer it shares by a CUDA IPC handle, and
// publishes it through a cuda-ipc send pool. Here, on GPU 1: the RecvScatter kernel reading the
// child's buffer through the IPC mapping (CUDA events), and the cuda-ipc puller's pull() of the
// child's handle and of the same KV published by a pool in this process (wall clock, from the
// call until the KV is in the blocks: the puller's thread hand-offs, the header's copy and checks,
// the block table's upload), each back to back and after 100 ms in which the GPUs idle (as
// between a serving decode's pulls). Every result is checked against the sender's bytes.
std::string cross_process_section(double peer_gbps, bool quick) {
  const int reps = quick ? 3 : 7;
  const TransferGeometry g(quick);

  // The sender's bytes, from this process's own copy of its cache.
  CHECK_OK(set_device(0));
  Stream s0 = value_or_die(Stream::create(), "stream");
  DeviceBuffer cache0 = g.sender_cache(s0.get());
  DeviceBuffer table0 = upload_table(g.table0);
  std::vector<uint8_t> want(g.wire_bytes);
  {
    DeviceBuffer wire = value_or_die(DeviceBuffer::allocate(g.wire_bytes), "allocate");
    CHECK_OK(gather_kv(g.kernel(cache0), table0.as<int32_t>(), g.tokens, wire.as<uint16_t>(), s0.get()));
    CHECK_OK(s0.synchronize());
    CHECK_OK(copy_to_host(want.data(), wire.data(), g.wire_bytes));
  }

  // The sender process. Everything it needs is made before the fork (this process has threads:
  // the child only redirects its standard streams and execs). The pipes are close-on-exec; dup2's
  // copies are not.
  std::vector<std::string> env_text;
  for (char** e = environ; *e != nullptr; ++e) env_text.emplace_back(*e);
  env_text.push_back(fmt::format("{}={}", kSenderChildEnv, quick ? "quick" : "full"));
  std::vector<char*> envp;
  for (std::string& e : env_text) envp.push_back(e.data());
  envp.push_back(nullptr);
  char self[] = "/proc/self/exe";
  char name[] = "pdserve_gpu_bench";
  char* argv[] = {name, nullptr};
  int to_child[2], from_child[2];
  if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0)
    die(internal_error("pipe failed"), "pipe");
  const pid_t child = fork();
  if (child < 0) die(internal_error("fork failed"), "fork");
  if (child == 0) {
    if (dup2(to_child[0], STDIN_FILENO) < 0 || dup2(from_child[1], STDOUT_FILENO) < 0) _exit(126);
    execve(self, argv, envp.data());
    _exit(127);
  }
  close(to_child[0]);
  close(from_child[1]);
  // Its two lines come at once, within a minute (it fills and gathers 1 GiB first).
  pollfd ready{from_child[0], POLLIN, 0};
  if (poll(&ready, 1, 60'000) != 1)
    die(internal_error("the sender process said nothing within 60 s"), "sender");
  FILE* from = fdopen(from_child[0], "r");
  if (from == nullptr) die(internal_error("fdopen failed"), "sender");
  char line[2 * KvHandle::kMaxEndpointBytes + 256];
  std::string raw_hex, handle_text;
  if (std::fgets(line, sizeof line, from) != nullptr) raw_hex = line;
  if (std::fgets(line, sizeof line, from) != nullptr) handle_text = line;
  while (!handle_text.empty() && (handle_text.back() == '\n')) handle_text.pop_back();
  IpcHandle raw{};
  if (raw_hex.size() < 2 * raw.size()) die(internal_error("the sender process said nothing"), "sender");
  for (size_t i = 0; i < raw.size(); ++i)
    raw[i] = static_cast<uint8_t>(std::stoi(raw_hex.substr(2 * i, 2), nullptr, 16));
  const KvHandle remote = value_or_die(KvHandle::parse(handle_text), "the sender's KV handle");

  CHECK_OK(set_device(1));
  Stream s1 = value_or_die(Stream::create(), "stream");
  DeviceBuffer cache1 = value_or_die(DeviceBuffer::allocate(g.cache_bytes), "allocate");
  DeviceBuffer table1 = upload_table(g.table1);
  DeviceBuffer check = value_or_die(DeviceBuffer::allocate(g.wire_bytes), "allocate");
  const PagedKvCache c1 = g.kernel(cache1);
  auto clear = [&] {
    CHECK_OK(set_device(1));
    CHECK_OK(fill_bytes(cache1.data(), 0, g.cache_bytes, s1.get()));
    CHECK_OK(s1.synchronize());
  };
  auto verify = [&](const char* what) {
    CHECK_OK(set_device(1));
    CHECK_OK(gather_kv(c1, table1.as<int32_t>(), g.tokens, check.as<uint16_t>(), s1.get()));
    CHECK_OK(s1.synchronize());
    std::vector<uint8_t> got(g.wire_bytes);
    CHECK_OK(copy_to_host(got.data(), check.data(), g.wire_bytes));
    if (got != want) {
      std::fprintf(stderr, "pdserve_gpu_bench: %s delivered wrong KV bytes\n", what);
      std::exit(1);
    }
  };

  // The kernel alone, reading through the IPC mapping.
  double kernel_ms = 0, kernel_idle_ms = 0;
  {
    IpcMapping m = value_or_die(IpcMapping::open(raw), "IPC mapping");
    const auto* body = static_cast<const uint16_t*>(m.data());
    auto scatter = [&] { CHECK_OK(scatter_kv(body, c1, table1.as<int32_t>(), g.tokens, s1.get())); };
    clear();
    kernel_ms = median_ms(2, reps, s1.get(), scatter);
    verify("RecvScatter through an IPC mapping");
    clear();
    kernel_idle_ms = median_after_idle_ms(reps, s1.get(), scatter);
    verify("RecvScatter through an IPC mapping after idling");
  }

  // The puller's pull(), of the child's handle and of one published here.
  KvTransportOptions ro;
  ro.send = false;
  ro.cuda_device = 1;
  KvTransport receiver = value_or_die(make_cuda_ipc_transport(ro), "cuda-ipc puller");
  CHECK_OK(set_device(0));
  KvTransport local = value_or_die(make_cuda_ipc_transport(g.send_options()), "cuda-ipc pool");
  const KvHandle here =
      value_or_die(local.pool->publish(g.view(cache0, 0), g.table0, g.tokens, 0), "publish");
  const KvScatterTarget target{g.view(cache1, 1), g.table1, g.tokens};
  struct PullTimes {
    double back_to_back = 0, after_idle = 0;
  };
  auto time_pulls = [&](const KvHandle& h, const char* what) {
    auto pull = [&] {
      const auto a = std::chrono::steady_clock::now();
      TransferState st = receiver.puller->pull(h, target);
      if (st.phase != TransferPhase::kDone) die(st.error, what);
      if (log_level() <= LogLevel::kDebug)  // beside the puller's own account of the pull
        std::printf("%s: %.0f us\n", what,
                    std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
    };
    PullTimes t;
    clear();
    t.back_to_back = median_wall_ms(2, reps, pull);
    verify(what);
    clear();
    t.after_idle = median_after_idle(reps, [&] { return median_wall_ms(0, 1, pull); });
    verify(what);
    return t;
  };
  const PullTimes in_process = time_pulls(here, "an in-process cuda-ipc pull");
  const PullTimes across = time_pulls(remote, "a cuda-ipc pull from another process");
  // The puller's mapping of the child's memory goes before the child does.
  receiver = KvTransport();
  local = KvTransport();
  close(to_child[1]);
  std::fclose(from);
  int child_status = 0;
  waitpid(child, &child_status, 0);

  auto share = [&](double ms) { return 100.0 * g.wire_bytes / (ms * 1e-3) / (peer_gbps * 1e9); };
  std::printf(
      "KV transfer %zu MiB across processes (peer copy %.0f GB/s): RecvScatter through an IPC mapping "
      "%.3f ms (%.0f%%), after 100 ms idle %.3f ms (%.0f%%); cuda-ipc pull(), wall clock: in one process "
      "%.3f ms (%.0f%%), after idle %.3f ms (%.0f%%); from another process %.3f ms (%.0f%%), after idle "
      "%.3f ms (%.0f%%)\n",
      g.wire_bytes >> 20, peer_gbps, kernel_ms, share(kernel_ms), kernel_idle_ms, share(kernel_idle_ms),
      in_process.back_to_back, share(in_process.back_to_back), in_process.after_idle,
      share(in_process.after_idle), across.back_to_back, share(across.back_to_back), across.after_idle,
      share(across.after_idle));
  Json j;
  j.add("bytes", static_cast<double>(g.wire_bytes));
  j.add("peer_gbps", peer_gbps);
  j.add("ipc_recv_scatter_ms", kernel_ms);
  j.add("ipc_recv_scatter_after_idle_ms", kernel_idle_ms);
  j.add("pull_in_process_ms", in_process.back_to_back);
  j.add("pull_in_process_after_idle_ms", in_process.after_idle);
  j.add("pull_across_processes_ms", across.back_to_back);
  j.add("pull_across_processes_after_idle_ms", across.after_idle);
  j.add("sender_exit_status", static_cast<double>(child_status));
  CHECK_OK(set_device(0));
  return j.str();
}

// The host-staged KV path (instances on different hosts, or GPUs without peer access): one
// request's KV, 4096 tokens of Llama-3.1-8B (512 MiB) in 16-token blocks, sent from a paged cache
// on GPU 0 through a host transport's send pool — publish(): gather on the GPU, copy into the
// pool's buffer, as a prefill's hand-off does — and pulled back into a second cache of the same
// GPU (into page-locked host memory, to the GPU, scatter), with the pool's memory page-locked and
// pageable. Wall-clock medians; every pull's blocks are checked against the sender's.
std::string host_stage_section(bool quick) {
  const int reps = quick ? 3 : 7;
  const int32_t layers = 32, block_size = 16, kv_heads = 8, head_dim = 128;
  const int32_t tokens = quick ? 1024 : 4096;
  const int32_t used = tokens / block_size, pool = used + 44;
  const int64_t row = int64_t{kv_heads} * head_dim;
  const int64_t part = int64_t{pool} * block_size * row;  // one layer's K (or V), values
  const KvLayout layout{0x5eedULL, KvDtype::kBF16, layers, kv_heads * head_dim};
  CHECK_OK(set_device(0));
  Stream s = value_or_die(Stream::create(), "stream");
  struct Cache {
    DeviceBuffer memory;
    PagedKvView view;
    PagedKvCache kernel;
    std::vector<int32_t> table;
    DeviceBuffer dtable;
  };
  auto make_cache = [&](uint32_t seed) {
    Cache c;
    c.memory = value_or_die(DeviceBuffer::allocate(static_cast<size_t>(2 * part * layers) * 2), "allocate");
    CHECK_OK(fill_uniform_bf16(c.memory.as<uint16_t>(), 2 * part * layers, 0, 1, seed, s.get()));
    c.view.base = c.memory.as<uint8_t>();
    c.view.block_bytes = static_cast<size_t>(block_size * row * 2);
    c.view.num_blocks = pool;
    c.view.block_size = block_size;
    c.view.layout = layout;
    c.view.memory = KvMemory::kCuda;
    c.view.cuda_device = 0;
    c.view.num_kv_heads = kv_heads;
    c.view.layer_bytes = static_cast<uint64_t>(2 * part * 2);
    c.view.v_offset_bytes = static_cast<uint64_t>(part * 2);
    c.kernel = PagedKvCache{c.memory.as<uint16_t>(), layers, 2 * part, part, block_size, kv_heads, head_dim};
    c.table.resize(static_cast<size_t>(pool));
    std::iota(c.table.begin(), c.table.end(), 0);
    std::shuffle(c.table.begin(), c.table.end(), std::mt19937(seed));
    c.table.resize(static_cast<size_t>(used));
    c.dtable = value_or_die(DeviceBuffer::allocate(c.table.size() * 4), "allocate");
    CHECK_OK(copy_to_device(c.dtable.data(), c.table.data(), c.table.size() * 4));
    return c;
  };
  Cache src = make_cache(21), dst = make_cache(22);
  const size_t wire_bytes = static_cast<size_t>(src.kernel.bytes(tokens));
  DeviceBuffer wire = value_or_die(DeviceBuffer::allocate(wire_bytes), "allocate");
  auto wire_of = [&](const Cache& c) {
    CHECK_OK(gather_kv(c.kernel, c.dtable.as<int32_t>(), tokens, wire.as<uint16_t>(), s.get()));
    CHECK_OK(s.synchronize());
    std::vector<uint8_t> out(wire_bytes);
    CHECK_OK(copy_to_host(out.data(), wire.data(), wire_bytes));
    return out;
  };
  const std::vector<uint8_t> want = wire_of(src);

  // The bus's rate each way: the body between the GPU and page-locked host memory.
  double to_host_gbps = 0, to_device_gbps = 0;
  {
    PinnedHostBuffer host = value_or_die(PinnedHostBuffer::allocate(wire_bytes), "pinned");
    const double d2h = median_ms(1, reps, s.get(), [&] {
      CHECK_OK(copy_to_host_async(host.data(), wire.data(), wire_bytes, s.get()));
    });
    const double h2d = median_ms(1, reps, s.get(), [&] {
      CHECK_OK(copy_to_device_async(wire.data(), host.data(), wire_bytes, s.get()));
    });
    to_host_gbps = wire_bytes / (d2h * 1e-3) / 1e9;
    to_device_gbps = wire_bytes / (h2d * 1e-3) / 1e9;
    std::printf(
        "host copy %zu MiB with page-locked memory: GPU to host %.2f ms, %.1f GB/s; host to GPU %.2f ms, "
        "%.1f GB/s\n",
        wire_bytes >> 20, d2h, to_host_gbps, h2d, to_device_gbps);
  }

  PinnedHostBuffer host_landing = value_or_die(PinnedHostBuffer::allocate(wire_bytes), "pinned");
  std::string rows = "[";
  // Each transport with its send pool pageable and page-locked; with it page-locked, each also
  // landing the layers on the GPU only after the whole body (as before the host pullers reported
  // the body's progress).
  struct Variant {
    TransportKind kind;
    bool locked, as_they_arrive;
  };
  for (const Variant v :
       {Variant{TransportKind::kShm, false, true}, Variant{TransportKind::kShm, true, true},
        Variant{TransportKind::kShm, true, false}, Variant{TransportKind::kTcp, false, true},
        Variant{TransportKind::kTcp, true, true}, Variant{TransportKind::kTcp, true, false}}) {
    const TransportKind kind = v.kind;
    const bool locked = v.locked;
    KvTransportOptions o;
    o.pool_capacity_bytes = kv_send_buffer_bytes(kv_message_bytes(layout, tokens));
    o.max_buffers = 2;
    o.cuda_device = 0;
    o.page_lock_host_stage = locked;
    o.land_layers_as_they_arrive = v.as_they_arrive;
    const auto t0 = std::chrono::steady_clock::now();
    KvTransport t = value_or_die(make_cuda_staged_transport(kind, o), "staged transport");
    const double start_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    // The same pull into page-locked host memory alone, by the host transport's own puller: what
    // the decode's landing on its GPU adds to the transfer.
    KvTransportOptions ho = o;
    ho.send = false;
    KvTransport host = value_or_die(make_transport(kind, ho), "host transport");
    PagedKvView landing;
    landing.base = host_landing.data();
    landing.block_bytes = wire_bytes;
    landing.num_blocks = 1;
    landing.block_size = tokens;
    landing.layout = layout;
    const int32_t one_block[] = {0};
    std::vector<double> send_ms, pull_ms, host_ms;
    for (int i = 0; i < reps + 1; ++i) {  // the first is a warm-up
      CHECK_OK(fill_bytes(dst.memory.data(), 0, dst.memory.bytes(), s.get()));
      CHECK_OK(s.synchronize());
      const auto a = std::chrono::steady_clock::now();
      KvHandle h = value_or_die(t.pool->publish(src.view, src.table, tokens, 0), "publish");
      const auto b = std::chrono::steady_clock::now();
      TransferState st = t.puller->pull(h, KvScatterTarget{dst.view, dst.table, tokens});
      const auto c = std::chrono::steady_clock::now();
      if (st.phase != TransferPhase::kDone) die(st.error, "pull");
      TransferState hs = host.puller->pull(h, KvScatterTarget{landing, one_block, tokens});
      const auto d = std::chrono::steady_clock::now();
      if (hs.phase != TransferPhase::kDone) die(hs.error, "host pull");
      CHECK_OK(t.pool->release(h.ref()));
      if (i == 0) continue;
      send_ms.push_back(std::chrono::duration<double, std::milli>(b - a).count());
      pull_ms.push_back(std::chrono::duration<double, std::milli>(c - b).count());
      host_ms.push_back(std::chrono::duration<double, std::milli>(d - c).count());
      if (wire_of(dst) != want) {
        std::fprintf(stderr, "pdserve_gpu_bench: the host-staged %s pull delivered wrong KV bytes\n",
                     std::string(transport_kind_name(kind)).c_str());
        std::exit(1);
      }
    }
    std::sort(send_ms.begin(), send_ms.end());
    std::sort(pull_ms.begin(), pull_ms.end());
    std::sort(host_ms.begin(), host_ms.end());
    const double send = send_ms[send_ms.size() / 2], pull = pull_ms[pull_ms.size() / 2];
    const double host_pull = host_ms[host_ms.size() / 2];
    std::printf(
        "host-staged %s, %zu MiB, pool %s: start %.0f ms; send (gather + copy to the pool) %.2f ms, %.1f "
        "GB/s (%.0f%% of GPU to host); pull (to page-locked memory, to the GPU, scatter) %.2f ms, %.1f "
        "GB/s; the same into host memory alone %.2f ms\n",
        std::string(transport_kind_name(kind)).c_str(), wire_bytes >> 20,
        locked ? (v.as_they_arrive ? "page-locked" : "page-locked, layers to the GPU after the body")
               : "pageable",
        start_ms, send, wire_bytes / (send * 1e-3) / 1e9,
        100.0 * wire_bytes / (send * 1e-3) / 1e9 / to_host_gbps, pull, wire_bytes / (pull * 1e-3) / 1e9,
        host_pull);
    Json r;
    r.add("transport", std::string(transport_kind_name(kind)));
    r.add("page_locked", locked ? 1 : 0);
    r.add("layers_as_they_arrive", v.as_they_arrive ? 1 : 0);
    r.add("bytes", static_cast<double>(wire_bytes));
    r.add("start_ms", start_ms);
    r.add("send_ms", send);
    r.add("pull_ms", pull);
    r.add("host_pull_ms", host_pull);
    rows += (rows.size() > 1 ? "," : "") + r.str();
  }
  Json j;
  j.add("to_host_gbps", to_host_gbps);
  j.add("to_device_gbps", to_device_gbps);
  j.add_raw("variants", rows + "]");
  return j.str();
}

// The hand-off of a 4096-token prompt of `model_name` through the host-staged tcp transport on
// GPU 0 (page-locked send pool), from the start of the prefill's forward pass until the decode's
// pull has the KV in its own cache on the same GPU: the KV sent whole after the pass (publish(),
// then the pull), against the KV sent layer by layer during it (send_kv_layer() after each layer's
// K/V writes, the pull under way from the start). Wall-clock medians; the pulled KV is checked
// against the prefill's.
std::string layer_wise_section(const std::string& model_name, bool quick) {
  const int32_t bs = 16, len = quick ? 1024 : 4096, per_seq = len / bs + 1;
  CudaModelOptions options = model_options(per_seq, bs, false);
  std::unique_ptr<CudaLlamaModel> m =
      value_or_die(CudaLlamaModel::synthetic(model_name, options, 1234), "synthetic model");
  const ModelConfig& c = m->config();
  const DeviceKv kv = *m->device_kv();
  PagedKvView src;
  src.base = kv.base;
  src.block_bytes = static_cast<size_t>(bs) * c.kv_dim() * 2;
  src.num_blocks = per_seq;
  src.block_size = bs;
  src.layout = KvLayout{m->fingerprint(), kv.fp16 ? KvDtype::kF16 : KvDtype::kBF16, c.num_layers, c.kv_dim()};
  src.memory = KvMemory::kCuda;
  src.cuda_device = 0;
  src.num_kv_heads = c.num_kv_heads;
  src.layer_bytes = kv.layer_bytes;
  src.v_offset_bytes = kv.v_offset_bytes;
  src.cuda_stream = kv.stream;
  PagedKvView dst = src;
  DeviceBuffer dst_memory = value_or_die(DeviceBuffer::allocate(m->kv_bytes()), "allocate");
  dst.base = dst_memory.as<uint8_t>();
  dst.cuda_stream = nullptr;
  std::vector<int32_t> table(static_cast<size_t>(per_seq));
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> dst_table(table.rbegin(), table.rend());
  std::vector<int32_t> tokens(static_cast<size_t>(len));
  for (int32_t t = 0; t < len; ++t) tokens[static_cast<size_t>(t)] = (t * 31 + 7) % c.vocab_size;

  KvTransportOptions o;
  o.pool_capacity_bytes = kv_send_buffer_bytes(kv_message_bytes(src.layout, len));
  o.max_buffers = 2;
  o.cuda_device = 0;
  KvTransport t = value_or_die(make_cuda_staged_transport(TransportKind::kTcp, o), "staged transport");
  if (!t.pool->supports_layer_wise()) {
    std::printf("layer-wise hand-off skipped: the send pool could not be page-locked\n");
    return "{}";
  }
  const KvScatterTarget target{dst, dst_table, len};
  auto wire = [&](const PagedKvView& v, const std::vector<int32_t>& tbl) {
    const PagedKvCache pc{reinterpret_cast<uint16_t*>(v.base),
                          c.num_layers,
                          static_cast<int64_t>(v.layer_bytes / 2),
                          static_cast<int64_t>(v.v_offset_bytes / 2),
                          bs,
                          c.num_kv_heads,
                          c.head_dim};
    DeviceBuffer dt = value_or_die(DeviceBuffer::allocate(tbl.size() * 4), "allocate");
    CHECK_OK(copy_to_device(dt.data(), tbl.data(), tbl.size() * 4));
    DeviceBuffer w = value_or_die(DeviceBuffer::allocate(static_cast<size_t>(pc.bytes(len))), "allocate");
    CHECK_OK(gather_kv(pc, dt.as<int32_t>(), len, w.as<uint16_t>(), nullptr));
    std::vector<uint8_t> out(w.bytes());
    CHECK_OK(copy_to_host(out.data(), w.data(), w.bytes()));
    return out;
  };
  auto check = [&](const char* what) {
    CHECK_OK(synchronize());
    if (wire(dst, dst_table) != wire(src, table)) {
      std::fprintf(stderr, "pdserve_gpu_bench: the %s hand-off delivered wrong KV bytes\n", what);
      std::exit(1);
    }
  };
  int32_t next = 0;
  ForwardBatch b;
  b.tokens = tokens;
  b.chunks.push_back({0, len, table, true});
  const int reps = quick ? 2 : 5;
  const double forward_ms = median_wall_ms(1, reps, [&] { CHECK_OK(m->forward_argmax(b, &next)); });
  const double whole_ms = median_wall_ms(1, reps, [&] {
    CHECK_OK(fill_bytes(dst_memory.data(), 0, dst_memory.bytes(), nullptr));
    CHECK_OK(synchronize());
    CHECK_OK(m->forward_argmax(b, &next));
    KvHandle h = value_or_die(t.pool->publish(src, table, len, 0), "publish");
    TransferState st = t.puller->pull(h, target);
    if (st.phase != TransferPhase::kDone) die(st.error, "pull");
    CHECK_OK(t.pool->release(h.ref()));
  });
  check("whole");
  std::vector<double> pass_ms;  // the forward pass with the sends, alone
  const double layered_ms = median_wall_ms(1, reps, [&] {
    CHECK_OK(fill_bytes(dst_memory.data(), 0, dst_memory.bytes(), nullptr));
    CHECK_OK(synchronize());
    const auto start = std::chrono::steady_clock::now();
    LayerWiseSend send = value_or_die(begin_layer_wise_kv(*t.pool, src.layout, len), "begin layer-wise");
    const TransferId id = value_or_die(t.puller->submit(send.handle, target), "submit");
    Status sent = ok_status();
    b.after_layer = [&](int32_t l) {
      if (sent.ok()) sent = send_kv_layer(*t.pool, send, src, table, l);
    };
    CHECK_OK(m->forward_argmax(b, &next));
    pass_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    b.after_layer = nullptr;
    CHECK_OK(sent);
    if (next < 0) die(internal_error("the model's logits held no usable value"), "layer-wise pass");
    CHECK_OK(t.pool->publish_progress(send.handle.ref(), c.num_layers, next));
    TransferState st = t.puller->wait(id);
    if (st.phase != TransferPhase::kDone) die(st.error, "layer-wise pull");
    if (st.first_token != next) {
      std::fprintf(stderr, "pdserve_gpu_bench: the layer-wise pull brought token %d, not %d\n",
                   st.first_token, next);
      std::exit(1);
    }
    CHECK_OK(t.pool->release(send.handle.ref()));
  });
  check("layer-wise");
  pass_ms.erase(pass_ms.begin());  // the warm-up's
  std::sort(pass_ms.begin(), pass_ms.end());
  const double with_sends_ms = pass_ms[pass_ms.size() / 2];
  std::printf(
      "layer-wise hand-off, %s, %d tokens (%.0f MiB of KV) over tcp, page-locked: prefill alone %.2f ms; "
      "prefill then the KV whole %.2f ms; layer by layer during the prefill %.2f ms (the prefill with its "
      "sends %.2f ms; the KV landed %.2f ms after it, against %.2f)\n",
      model_name.c_str(), len, src.layout.body_bytes(len) / 1048576.0, forward_ms, whole_ms, layered_ms,
      with_sends_ms, layered_ms - with_sends_ms, whole_ms - forward_ms);
  Json j;
  j.add("model", model_name);
  j.add("tokens", len);
  j.add("kv_bytes", static_cast<double>(src.layout.body_bytes(len)));
  j.add("prefill_ms", forward_ms);
  j.add("prefill_then_whole_ms", whole_ms);
  j.add("layer_wise_ms", layered_ms);
  j.add("prefill_with_sends_ms", with_sends_ms);
  return j.str();
}

// Three forward passes, kernels launched one by one, the third between profiler_start() and
// profiler_stop(): for a profiler. Decode steps at position ctx (prompt_len 0), or prefills of
// prompt_len tokens. With `timeline`, a fourth pass's kernels as they ran (CUPTI, whose set-up takes
// the third) and its wall clock instead.
int profile_steps(const std::string& name, int32_t batch, int32_t ctx, int32_t prompt_len, bool timeline) {
  const bool decode = prompt_len == 0;
  const int32_t bs = 16, per_seq = (decode ? ctx : prompt_len) / bs + 1;
  CudaModelOptions options = model_options(batch * per_seq, bs, false);
  std::unique_ptr<CudaLlamaModel> m =
      value_or_die(CudaLlamaModel::synthetic(name, options, 1234), "synthetic model");
  CHECK_OK(m->randomize_kv(99));
  std::vector<std::vector<int32_t>> tables(batch);
  ForwardBatch b;
  // Token ids as the benchmark's prefills take them: a product's speed depends on its data (power).
  std::vector<int32_t> tokens(static_cast<size_t>(batch) * (decode ? 1 : prompt_len)), next(batch);
  const size_t per_prompt = decode ? 1 : static_cast<size_t>(prompt_len);
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<int32_t>((i / per_prompt * 7919 + i % per_prompt * 31) % m->config().vocab_size);
  b.tokens = tokens;
  for (int32_t s = 0; s < batch; ++s) {
    tables[s].resize(per_seq);
    std::iota(tables[s].begin(), tables[s].end(), s * per_seq);
    b.chunks.push_back({decode ? ctx : 0, decode ? 1 : prompt_len, tables[s], true});
  }
  for (int i = 0; i < 2; ++i) CHECK_OK(m->forward_argmax(b, next.data()));
  if (timeline) {
    // The host's progress through the enqueueing, marked after the first and the last layer.
    const int32_t layers = m->config().num_layers;
    b.after_layer = [layers](int32_t layer) {
      if (layer == 0) bench::timeline_mark("layer 0 enqueued up to its attention");
      if (layer == layers - 1) bench::timeline_mark("last layer enqueued up to its attention");
    };
    CHECK_OK(bench::timeline_start());
    CHECK_OK(m->forward_argmax(b, next.data()));  // CUPTI's own set-up, not recorded
    CHECK_OK(bench::timeline_discard());
    bench::timeline_mark("forward pass called");
    const double t0 = now_ms();
    CHECK_OK(m->forward_argmax(b, next.data()));
    const double wall_ms = now_ms() - t0;
    bench::timeline_mark("forward pass returned");
    std::printf("the pass: %.3f ms by the wall clock, from the call to the token ids on the host\n", wall_ms);
    CHECK_OK(bench::timeline_stop(stdout));
  } else {
    CHECK_OK(profiler_start());
    CHECK_OK(m->forward_argmax(b, next.data()));
    CHECK_OK(profiler_stop());
  }
  const char* which = timeline ? "fourth of 4" : "third of 3";
  if (decode)
    std::printf("profiled the %s decode steps of %s at batch %d, context %d\n", which, name.c_str(), batch,
                ctx);
  else
    std::printf("profiled the %s prefills of %s, %d x %d tokens\n", which, name.c_str(), batch, prompt_len);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // PDSERVE_LOG_LEVEL=debug: the cuda-ipc puller logs where each pull's time goes.
  if (const char* name = std::getenv("PDSERVE_LOG_LEVEL"); name != nullptr && *name != '\0') {
    LogLevel level;
    if (!parse_log_level(name, &level)) {
      std::fprintf(stderr, "pdserve_gpu_bench: PDSERVE_LOG_LEVEL=%s is not a log level\n", name);
      return 2;
    }
    set_log_level(level);
  }
  if (const char* sender = std::getenv(kSenderChildEnv))
    return kv_sender_child(std::strcmp(sender, "quick") == 0);
  std::string json_path;
  bool quick = false;
  std::string model_name = "synthetic:llama-3.1-8b";
  int profile_batch = 0, profile_ctx = 0, profile_prompt = 0;
  bool profile_timeline = false;
  bool transfer_only = false, decode_only = false, prefill_only = false, attention_only = false,
       products_only = false;
  int balance_keys = kDefaultDecodeBalanceKeys;
  double tc_pairs_per_sm = kDefaultDecodeTensorCorePairsPerSm;
  double split_ctas_per_sm = 2.0;  // the library's default
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_name = argv[++i];
    } else if (std::strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
      const std::string d = argv[++i];
      if (d != "bf16" && d != "fp16") {
        std::fprintf(stderr, "pdserve_gpu_bench: --dtype wants bf16 or fp16, got '%s'\n", d.c_str());
        return 2;
      }
      g_dtype = d == "fp16" ? cuda::Dtype::kF16 : cuda::Dtype::kBf16;
    } else if (std::strcmp(argv[i], "--transfer-only") == 0) {
      transfer_only = true;
    } else if (std::strcmp(argv[i], "--no-model") == 0) {
      model_name.clear();
    } else if (std::strcmp(argv[i], "--no-programmatic-launch") == 0) {
      set_programmatic_launch(false);
    } else if (std::strcmp(argv[i], "--prefill-attention-mma") == 0) {
      set_prefill_attention_wgmma(false);
    } else if (std::strcmp(argv[i], "--decode-balance-keys") == 0 && i + 1 < argc) {
      balance_keys = std::atoi(argv[++i]);
      set_decode_balance_keys(balance_keys);
    } else if (std::strcmp(argv[i], "--gemv-max-rows") == 0 && i + 1 < argc) {
      set_gemv_max_rows(std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--decode-batches") == 0 && i + 1 < argc) {
      if (!parse_sizes("--decode-batches", "batch sizes", argv[++i], 4096, &g_decode_batches)) return 2;
    } else if (std::strcmp(argv[i], "--decode-contexts") == 0 && i + 1 < argc) {
      if (!parse_sizes("--decode-contexts", "contexts", argv[++i], 131072, &g_decode_contexts)) return 2;
    } else if (std::strcmp(argv[i], "--decode-split-ctas-per-sm") == 0 && i + 1 < argc) {
      split_ctas_per_sm = std::atof(argv[++i]);
      set_decode_split_ctas_per_sm(split_ctas_per_sm);
    } else if (std::strcmp(argv[i], "--decode-tc-pairs-per-sm") == 0 && i + 1 < argc) {
      tc_pairs_per_sm = std::atof(argv[++i]);
      set_decode_tensor_core_pairs_per_sm(tc_pairs_per_sm);
    } else if (std::strcmp(argv[i], "--decode-only") == 0) {
      decode_only = true;
    } else if (std::strcmp(argv[i], "--attention-only") == 0) {
      attention_only = true;
    } else if (std::strcmp(argv[i], "--products-only") == 0) {
      products_only = true;
    } else if (std::strcmp(argv[i], "--no-product-tuning") == 0) {
      set_product_tuning(false);
    } else if (std::strcmp(argv[i], "--prefill-only") == 0) {
      prefill_only = true;
    } else if ((std::strcmp(argv[i], "--profile-prefill") == 0 ||
                std::strcmp(argv[i], "--timeline-prefill") == 0) &&
               i + 1 < argc) {
      profile_timeline = std::strcmp(argv[i], "--timeline-prefill") == 0;
      if (std::sscanf(argv[++i], "%d,%d", &profile_batch, &profile_prompt) != 2 || profile_batch <= 0 ||
          profile_prompt <= 0) {
        std::fprintf(stderr, "pdserve_gpu_bench: %s wants PROMPTS,TOKENS (e.g. 1,4096)\n", argv[i - 1]);
        return 2;
      }
    } else if ((std::strcmp(argv[i], "--profile-decode") == 0 ||
                std::strcmp(argv[i], "--timeline-decode") == 0) &&
               i + 1 < argc) {
      profile_timeline = std::strcmp(argv[i], "--timeline-decode") == 0;
      if (std::sscanf(argv[++i], "%d,%d", &profile_batch, &profile_ctx) != 2 || profile_batch <= 0 ||
          profile_ctx <= 0) {
        std::fprintf(stderr, "pdserve_gpu_bench: %s wants BATCH,CONTEXT (e.g. 1,1024)\n", argv[i - 1]);
        return 2;
      }
    } else {
      std::fprintf(
          stderr,
          "usage: pdserve_gpu_bench [--json PATH] [--quick] [--model NAME | --no-model]\n"
          "  --json PATH   also write the results as JSON to PATH\n"
          "  --quick       fewer repetitions and smaller sizes (a smoke run)\n"
          "  --model NAME  the model of the decode and prefill figures (default\n"
          "                synthetic:llama-3.1-8b; also synthetic:qwen2.5-7b, synthetic:smollm2-1.7b)\n"
          "  --no-model    only the ceilings and the attention kernel\n"
          "  --dtype bf16|fp16  the models' number format (default bf16)\n"
          "  --no-programmatic-launch  every kernel starts after the one before it has\n"
          "                ended (by default the model's kernels overlap the one ahead)\n"
          "  --prefill-attention-mma  prefill attention on mma.sync even where Hopper's\n"
          "                warpgroup MMA form runs (sm_90 GPUs take it)\n"
          "  --decode-balance-keys N  the fewest keys a CTA of the tensor-core decode attention\n"
          "                takes when it shares all (sequence, kv head) pairs' keys evenly among one\n"
          "                wave of CTAs (default 64; 0: one CTA a pair, no balancing)\n"
          "  --decode-split-ctas-per-sm X  the CTAs an SM the split-KV decode attention's\n"
          "                split of a sequence's keys aims at (default 2)\n"
          "  --decode-tc-pairs-per-sm X  decode steps with at least X (sequence, kv head) pairs\n"
          "                an SM take the tensor-core attention, fewer the split-KV kernel\n"
          "                (default 0: always the tensor-core attention where its form allows)\n"
          "  --gemv-max-rows N  model steps of at most N rows (0 to 8, default 1) use the\n"
          "                matrix-vector kernels, larger ones cuBLAS\n"
          "  --decode-batches B1,B2,...  the batch sizes of the model's decode steps (default\n"
          "                1,16,64)\n"
          "  --decode-contexts C1,C2,...  the cached tokens of each sequence in those steps\n"
          "                (default 1024,4096; every batch at every context)\n"
          "  --decode-only only the ceilings and the model's decode steps\n"
          "  --prefill-only  only the ceilings and the model's prefills\n"
          "  --attention-only  only the ceilings and the attention kernels alone (decode\n"
          "                steps, and one layer's prefill of 1 x 4096 and 8 x 512 tokens)\n"
          "  --no-product-tuning  the model's products keep cuBLAS's choice of algorithm (by\n"
          "                default each bucket of decode batch sizes times cuBLASLt's candidates\n"
          "                at its first step and keeps the fastest)\n"
          "  --products-only  only the ceilings and the model's matrix products (Llama-3.1-8B's\n"
          "                shapes, 16 to 4096 rows): cuBLAS's default algorithm against the\n"
          "                fastest of cuBLASLt's heuristic candidates\n"
          "  --transfer-only  only the peer copy and the KV transfer between GPUs 0 and 1,\n"
          "                the host-staged KV path (shm, tcp) on GPU 0, and a --model prefill's\n"
          "                hand-off through it, whole and layer by layer\n"
          "  --profile-decode B,C  only three decode steps of --model at batch B, context C,\n"
          "                launched one by one (for a profiler such as ncu)\n"
          "  --profile-prefill P,T  the same with three prefills of P prompts of T tokens\n"
          "  --timeline-decode B,C, --timeline-prefill P,T  the same with a fourth pass,\n"
          "                whose kernels are listed as they ran among the others (CUPTI):\n"
          "                time busy, idle between kernels, the host's progress, and each\n"
          "                kernel's total, against the pass's wall clock\n");
      return 2;
    }
  }
  if (profile_batch > 0)
    return profile_steps(model_name, profile_batch, profile_ctx, profile_prompt, profile_timeline);
  const int devices = device_count();
  if (devices == 0) {
    std::fprintf(stderr, "pdserve_gpu_bench: no CUDA device (%s)\n", no_device_reason().c_str());
    return 1;
  }
  CHECK_OK(set_device(0));
  const DeviceInfo info = value_or_die(device_info(0), "device_info");
  std::printf("GPU 0: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB; %d GPU(s)\n", info.name.c_str(),
              info.compute_major, info.compute_minor, info.multiprocessors, info.memory_bytes / 1073741824.0,
              info.l2_bytes / 1048576.0, devices);
  Json out;
  out.add("gpu", info.name);
  out.add("programmatic_launch", programmatic_launch() ? 1 : 0);
  out.add("prefill_attention_wgmma", prefill_attention_uses_wgmma(128) ? 1 : 0);
  std::printf("prefill attention on %s\n",
              prefill_attention_uses_wgmma(128) ? "warpgroup MMA (wgmma)" : "mma.sync");
  out.add("decode_balance_keys", balance_keys);
  out.add("decode_tc_pairs_per_sm", tc_pairs_per_sm);
  out.add("decode_split_ctas_per_sm", split_ctas_per_sm);
  out.add("product_tuning", product_tuning() ? 1 : 0);
  out.add("gpus", devices);
  Stream stream = value_or_die(Stream::create(), "stream");
  const int reps = quick ? 5 : 20;

  // 1. Copy bandwidth: far larger than L2 (needed by the sections after the transfer).
  const size_t copy_bytes = quick ? (size_t{256} << 20) : (size_t{2} << 30);
  double copy_gbps = 0;
  {
    DeviceBuffer a = value_or_die(DeviceBuffer::allocate(copy_bytes), "allocate");
    DeviceBuffer b = value_or_die(DeviceBuffer::allocate(copy_bytes), "allocate");
    CHECK_OK(fill_bytes(a.data(), 1, copy_bytes, stream.get()));
    const double ms = median_ms(3, reps, stream.get(), [&] {
      CHECK_OK(copy_device_to_device(b.data(), a.data(), copy_bytes, stream.get()));
    });
    copy_gbps = 2.0 * copy_bytes / (ms * 1e-3) / 1e9;
    std::printf("copy   %.2f GiB device to device: %.3f ms, %.0f GB/s (read + written)\n",
                copy_bytes / 1073741824.0, ms, copy_gbps);
    out.add("copy_bytes", static_cast<double>(copy_bytes));
    out.add("copy_gbps", copy_gbps);
  }

  // 2. The matrix product rate in the models' format (--dtype; bf16 by default).
  double gemm_tflops = 0;
  {
    const int64_t n = quick ? 4096 : 8192;
    Blas blas = value_or_die(Blas::create(), "blas");
    DeviceBuffer x = random_values(n * n, 1.0f, 1, g_dtype);
    DeviceBuffer w = random_values(n * n, 1.0f, 2, g_dtype);
    DeviceBuffer y = value_or_die(DeviceBuffer::allocate(n * n * 2), "allocate");
    const double ms = median_ms(3, reps, stream.get(), [&] {
      CHECK_OK(blas.matmul(x.as<uint16_t>(), w.as<uint16_t>(), n, n, n, y.as<uint16_t>(), stream.get(), 0, 0,
                           g_dtype));
    });
    gemm_tflops = 2.0 * n * n * n / (ms * 1e-3) / 1e12;
    std::printf("gemm   %ldx%ldx%ld %s (cuBLAS): %.3f ms, %.0f TFLOP/s\n", static_cast<long>(n),
                static_cast<long>(n), static_cast<long>(n), dtype_name(g_dtype), ms, gemm_tflops);
    out.add("gemm_n", static_cast<double>(n));
    out.add("gemm_tflops", gemm_tflops);
    out.add_raw("gemm_dtype", std::string("\"") + dtype_name(g_dtype) + "\"");
  }

  if (products_only) {
    out.add_raw("products", bench::products_section(g_dtype == Dtype::kF16, quick, copy_gbps, gemm_tflops));
    CHECK_OK(synchronize());
    return write_json(json_path, out);
  }
  if (decode_only || prefill_only) {
    if (!model_name.empty())
      out.add_raw("model",
                  model_section(model_name, quick, decode_only, prefill_only, copy_gbps, gemm_tflops));
    CHECK_OK(synchronize());
    return write_json(json_path, out);
  }

  // 3. Peer copy between GPUs 0 and 1.
  if (devices >= 2 && !attention_only) {
    const size_t bytes = size_t{1} << 30;
    DeviceBuffer a = value_or_die(DeviceBuffer::allocate(bytes), "allocate");
    CHECK_OK(set_device(1));
    Status peer10 = enable_peer_access(0);
    DeviceBuffer b = value_or_die(DeviceBuffer::allocate(bytes), "allocate");
    CHECK_OK(set_device(0));
    Status peer01 = enable_peer_access(1);
    std::printf("peer access 0->1: %s, 1->0: %s\n", peer01.ok() ? "yes" : peer01.to_string().c_str(),
                peer10.ok() ? "yes" : peer10.to_string().c_str());
    const double ms01 = median_ms(2, reps / 2, stream.get(), [&] {
      CHECK_OK(copy_peer(b.data(), 1, a.data(), 0, bytes, stream.get()));
    });
    const double ms10 = median_ms(2, reps / 2, stream.get(), [&] {
      CHECK_OK(copy_peer(a.data(), 0, b.data(), 1, bytes, stream.get()));
    });
    std::printf("peer   1 GiB GPU0->GPU1: %.3f ms, %.1f GB/s; GPU1->GPU0: %.3f ms, %.1f GB/s\n", ms01,
                bytes / (ms01 * 1e-3) / 1e9, ms10, bytes / (ms10 * 1e-3) / 1e9);
    out.add("peer_gbps_0to1", bytes / (ms01 * 1e-3) / 1e9);
    out.add("peer_gbps_1to0", bytes / (ms10 * 1e-3) / 1e9);
    a = DeviceBuffer();
    b = DeviceBuffer();
    if (peer10.ok()) {
      out.add_raw("kv_transfer", transfer_section(bytes / (ms01 * 1e-3) / 1e9, quick));
      out.add_raw("kv_transfer_across_processes", cross_process_section(bytes / (ms01 * 1e-3) / 1e9, quick));
    } else {
      std::printf("KV transfer between GPUs skipped: GPU 1 cannot read GPU 0's memory\n");
    }
  }
  // 4. The host-staged KV path, on GPU 0, and a prefill's hand-off through it.
  if (!attention_only) {
    out.add_raw("kv_host_stage", host_stage_section(quick));
    if (!model_name.empty()) out.add_raw("kv_layer_wise", layer_wise_section(model_name, quick));
  }
  if (transfer_only) {
    CHECK_OK(synchronize());
    return write_json(json_path, out);
  }

  // 5. Matrix-vector products at one row (a batch-1 decode step's projections), as a share of the
  // copy bandwidth: cuBLAS, and each shape of work per warp of our gemv.
  if (!attention_only) {
    struct Proj {
      const char* name;
      int64_t n, k;
      bool normed;
      bool normed_swiglu = false;  // the model runs it with SwiGLU fused (no split-K form)
    };
    const Proj projs[] = {{"qkv", 6144, 4096, true},
                          {"o", 4096, 4096, false},
                          {"gate_up", 28672, 4096, true, true},
                          {"down", 4096, 14336, false}};
    DeviceBuffer w = random_values(size_t{28672} * 4096, 0.05f, 11);
    DeviceBuffer xb = random_values(14336, 1.0f, 12);
    DeviceBuffer x = value_or_die(DeviceBuffer::allocate(14336 * 4), "allocate");
    DeviceBuffer nw = value_or_die(DeviceBuffer::allocate(14336 * 4), "allocate");
    DeviceBuffer y = value_or_die(DeviceBuffer::allocate(28672 * 4), "allocate");
    DeviceBuffer hidden = value_or_die(DeviceBuffer::allocate(14336 * 2), "allocate");
    CHECK_OK(fill_uniform_f32(x.as<float>(), 14336, 0.0f, 1.0f, 13, stream.get()));
    CHECK_OK(fill_uniform_f32(nw.as<float>(), 14336, 1.0f, 0.1f, 14, stream.get()));
    Blas blas = value_or_die(Blas::create(), "blas");
    const int variants[][2] = {{1, 2}, {1, 4}, {2, 1}, {2, 2}, {4, 1}, {4, 2}};
    std::string rows = "[";
    for (const Proj& p : projs) {
      const double bytes = 2.0 * p.n * p.k;
      auto pct = [&](double ms) { return 100.0 * bytes / (ms * 1e-3) / (copy_gbps * 1e9); };
      const double cublas_ms = median_ms(3, reps, stream.get(), [&] {
        CHECK_OK(
            blas.matmul_f32(xb.as<uint16_t>(), w.as<uint16_t>(), 1, p.n, p.k, y.as<float>(), stream.get()));
      });
      std::printf("gemv %-7s %5ldx%5ld: cuBLAS %.1f us (%.0f%%)", p.name, static_cast<long>(p.n),
                  static_cast<long>(p.k), cublas_ms * 1e3, pct(cublas_ms));
      Json row;
      row.add("name", std::string(p.name));
      row.add("cublas_ms", cublas_ms);
      // One row of the projection's input (normalised on the fly where the model does), float out.
      auto one_row = [&] {
        GemvArgs g;
        if (p.normed) {
          g.x = x.as<float>();
          g.norm_w = nw.as<float>();
        } else {
          g.xb = xb.as<uint16_t>();
        }
        g.w = w.as<uint16_t>();
        g.m = 1;
        g.n = p.n;
        g.k = p.k;
        g.y = y.as<float>();
        return g;
      };
      for (const auto& v : variants) {
        for (int ctas : {0, 8, 16}) {
          const GemvArgs g = one_row();
          const double ms = median_ms(3, reps, stream.get(),
                                      [&] { CHECK_OK(gemv_variant(g, v[0], v[1], ctas, stream.get())); });
          std::printf(" | %dx%d/%d %.0f%%", v[0], v[1], ctas, pct(ms));
          row.add(fmt::format("r{}d{}c{}_ms", v[0], v[1], ctas), ms);
        }
      }
      if (p.normed_swiglu) {  // as the model runs it: gate|up with SwiGLU, bf16 out
        for (const auto& v : {std::array<int, 2>{2, 1}, {2, 2}, {4, 1}, {4, 2}}) {
          GemvArgs g = one_row();
          g.n = p.n / 2;
          g.y = nullptr;
          g.swiglu_out = hidden.as<uint16_t>();
          const double ms = median_ms(3, reps, stream.get(),
                                      [&] { CHECK_OK(gemv_variant(g, v[0], v[1], 0, stream.get())); });
          std::printf(" | SwiGLU %dx%d %.0f%%", v[0], v[1], pct(ms));
          row.add(fmt::format("swiglu_r{}d{}_ms", v[0], v[1]), ms);
        }
      }
      if (p.k % 2048 == 0 && !p.normed_swiglu) {
        const GemvArgs g = one_row();
        for (int per_cta : {1, 2, 4, 8, 16}) {
          if (per_cta * (p.k / 2048) > 32) continue;
          const double ms = median_ms(3, reps, stream.get(),
                                      [&] { CHECK_OK(gemv_variant(g, 0, per_cta, 0, stream.get())); });
          std::printf(" | split-K/%d %.0f%%", per_cta, pct(ms));
          row.add(fmt::format("split_k{}_ms", per_cta), ms);
        }
      }
      std::printf("\n");
      rows += (rows.size() > 1 ? ", " : "") + row.str();
    }
    out.add_raw("gemv", rows + "]");
  }

  // 6. Decode attention vs the bandwidth floor (one layer of Llama-3.1-8B).
  {
    const int32_t heads = 32, kv_heads = 8, head_dim = 128, block = 16;
    std::string rows = "[";
    for (int32_t batch : {1, 16, 64}) {
      for (int32_t ctx : {1024, 4096}) {
        if (quick && batch * ctx > 16 * 1024) continue;
        const int32_t blocks_per_seq = ctx / block;
        const int64_t blocks = int64_t{batch} * blocks_per_seq;
        const int64_t kv_values = blocks * block * kv_heads * head_dim;
        DeviceBuffer k = random_values(kv_values, 1.0f, 3, g_dtype);
        DeviceBuffer v = random_values(kv_values, 1.0f, 4, g_dtype);
        DeviceBuffer q = random_values(int64_t{batch} * heads * head_dim, 1.0f, 5, g_dtype);
        DeviceBuffer o =
            value_or_die(DeviceBuffer::allocate(int64_t{batch} * heads * head_dim * 2), "allocate");
        // Blocks of each sequence spread over the pool, as after a while of serving.
        std::vector<int32_t> table(blocks);
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), std::mt19937(7));
        std::vector<int32_t> lens(batch, ctx);
        DeviceBuffer dtable = value_or_die(DeviceBuffer::allocate(table.size() * 4), "allocate");
        DeviceBuffer dlens = value_or_die(DeviceBuffer::allocate(lens.size() * 4), "allocate");
        CHECK_OK(copy_to_device(dtable.data(), table.data(), table.size() * 4));
        CHECK_OK(copy_to_device(dlens.data(), lens.data(), lens.size() * 4));
        DecodeAttentionArgs a;
        a.q = q.as<uint16_t>();
        a.num_seqs = batch;
        a.num_heads = heads;
        a.kv = PagedKv{k.as<uint16_t>(), v.as<uint16_t>(), block, kv_heads, head_dim, g_dtype};
        a.block_tables = dtable.as<int32_t>();
        a.max_blocks_per_seq = blocks_per_seq;
        a.seq_lens = dlens.as<int32_t>();
        a.max_seq_len = ctx;
        a.scale = 0.088f;
        a.out = o.as<uint16_t>();
        const size_t ws_bytes = decode_attention_workspace_bytes(a);
        DeviceBuffer ws = value_or_die(DeviceBuffer::allocate(std::max<size_t>(ws_bytes, 1)), "allocate");
        DeviceBuffer counters =
            value_or_die(DeviceBuffer::allocate(static_cast<size_t>(batch) * kv_heads * 4), "allocate");
        CHECK_OK(fill_bytes(counters.data(), 0, counters.bytes(), stream.get()));
        a.split_counters = counters.as<int32_t>();
        const double ms = median_ms(5, reps * 2, stream.get(), [&] {
          CHECK_OK(decode_attention(a, ws.data(), ws_bytes, stream.get()));
        });
        // The same queries through the tensor-core kernel: each sequence a one-token chunk.
        std::vector<int32_t> q_start(batch), one(batch, 1), first(batch, ctx - 1);
        std::iota(q_start.begin(), q_start.end(), 0);
        DeviceBuffer dstart = value_or_die(DeviceBuffer::allocate(batch * 4), "allocate");
        DeviceBuffer done = value_or_die(DeviceBuffer::allocate(batch * 4), "allocate");
        DeviceBuffer dfirst = value_or_die(DeviceBuffer::allocate(batch * 4), "allocate");
        CHECK_OK(copy_to_device(dstart.data(), q_start.data(), batch * 4));
        CHECK_OK(copy_to_device(done.data(), one.data(), batch * 4));
        CHECK_OK(copy_to_device(dfirst.data(), first.data(), batch * 4));
        PrefillAttentionArgs p;
        p.q = a.q;
        p.num_heads = heads;
        p.kv = a.kv;
        p.num_chunks = batch;
        p.chunk_q_start = dstart.as<int32_t>();
        p.chunk_len = done.as<int32_t>();
        p.chunk_first_pos = dfirst.as<int32_t>();
        p.block_tables = a.block_tables;
        p.max_blocks_per_seq = blocks_per_seq;
        p.max_chunk_len = 1;
        p.scale = a.scale;
        p.out = a.out;
        const double tc_ms =
            median_ms(5, reps * 2, stream.get(), [&] { CHECK_OK(prefill_attention(p, stream.get())); });
        // Again with the workspace of the balanced form (all pairs' keys shared by one wave of CTAs),
        // at a few settings of the fewest keys a CTA.
        std::vector<std::pair<int32_t, double>> balanced;
        for (const int32_t min_keys : {64, 256, 1024}) {
          set_decode_balance_keys(min_keys);
          p.workspace_bytes = prefill_attention_workspace_bytes(p);
          DeviceBuffer pws =
              value_or_die(DeviceBuffer::allocate(std::max<size_t>(p.workspace_bytes, 1)), "allocate");
          p.workspace = pws.data();
          p.split_counters = counters.as<int32_t>();
          balanced.emplace_back(min_keys, median_ms(5, reps * 2, stream.get(),
                                                    [&] { CHECK_OK(prefill_attention(p, stream.get())); }));
          p.workspace = nullptr;
          p.workspace_bytes = 0;
        }
        set_decode_balance_keys(balance_keys);
        const double bytes = 2.0 * kv_values * 2;
        const double floor_ms = bytes / (copy_gbps * 1e9) * 1e3;
        std::printf("decode attention batch %2d ctx %4d, tensor-core kernel: %.4f ms, %.0f%% of floor\n",
                    batch, ctx, tc_ms, 100.0 * floor_ms / tc_ms);
        for (const auto& [min_keys, b_ms] : balanced)
          std::printf(
              "decode attention batch %2d ctx %4d, tensor-core balanced, %d keys a CTA at least: %.4f ms, "
              "%.0f%% of floor\n",
              batch, ctx, min_keys, b_ms, 100.0 * floor_ms / b_ms);
        std::printf(
            "decode attention batch %2d ctx %4d: %.4f ms, floor %.4f ms (%.1f MiB KV), %.0f%% of floor\n",
            batch, ctx, ms, floor_ms, bytes / 1048576.0, 100.0 * floor_ms / ms);
        Json row;
        row.add("batch", batch);
        row.add("ctx", ctx);
        row.add("ms", ms);
        row.add("tensor_core_ms", tc_ms);
        for (const auto& [min_keys, b_ms] : balanced)
          row.add(fmt::format("tensor_core_balanced{}_ms", min_keys), b_ms);
        row.add("floor_ms", floor_ms);
        rows += (rows.size() > 1 ? ", " : "") + row.str();
      }
    }
    out.add_raw("decode_attention", rows + "]");
  }

  // 6b. Prefill attention alone (one layer of Llama-3.1-8B in the models' format, prompts from
  // position 0, blocks spread over the pool; K and V, 16 MiB, stay in L2 from one run to the next,
  // as in a prefill that has just written them) vs the FLOP floor at the measured matrix rate:
  // causal attention is 2 · L · (L + 1) · q_dim FLOP a prompt of L tokens (the kernel computes whole
  // tiles on the diagonal, which the floor does not count).
  {
    const int32_t heads = 32, kv_heads = 8, head_dim = 128, block = 16;
    std::string rows = "[";
    for (const auto& [seqs, len] : {std::pair{1, 4096}, std::pair{8, 512}}) {
      const int32_t blocks_per_seq = len / block;
      const int64_t blocks = int64_t{seqs} * blocks_per_seq;
      const int64_t kv_values = blocks * block * kv_heads * head_dim;
      const int64_t tokens = int64_t{seqs} * len;
      DeviceBuffer k = random_values(kv_values, 1.0f, 13, g_dtype);
      DeviceBuffer v = random_values(kv_values, 1.0f, 14, g_dtype);
      DeviceBuffer q = random_values(tokens * heads * head_dim, 1.0f, 15, g_dtype);
      DeviceBuffer o = value_or_die(DeviceBuffer::allocate(tokens * heads * head_dim * 2), "allocate");
      std::vector<int32_t> table(blocks);
      std::iota(table.begin(), table.end(), 0);
      std::shuffle(table.begin(), table.end(), std::mt19937(17));
      std::vector<int32_t> q_start(seqs), lens(seqs, len), first(seqs, 0);
      for (int32_t s = 0; s < seqs; ++s) q_start[s] = s * len;
      DeviceBuffer dtable = value_or_die(DeviceBuffer::allocate(table.size() * 4), "allocate");
      DeviceBuffer dstart = value_or_die(DeviceBuffer::allocate(seqs * 4), "allocate");
      DeviceBuffer dlens = value_or_die(DeviceBuffer::allocate(seqs * 4), "allocate");
      DeviceBuffer dfirst = value_or_die(DeviceBuffer::allocate(seqs * 4), "allocate");
      CHECK_OK(copy_to_device(dtable.data(), table.data(), table.size() * 4));
      CHECK_OK(copy_to_device(dstart.data(), q_start.data(), seqs * 4));
      CHECK_OK(copy_to_device(dlens.data(), lens.data(), seqs * 4));
      CHECK_OK(copy_to_device(dfirst.data(), first.data(), seqs * 4));
      PrefillAttentionArgs p;
      p.q = q.as<uint16_t>();
      p.num_heads = heads;
      p.kv = PagedKv{k.as<uint16_t>(), v.as<uint16_t>(), block, kv_heads, head_dim, g_dtype};
      p.num_chunks = seqs;
      p.chunk_q_start = dstart.as<int32_t>();
      p.chunk_len = dlens.as<int32_t>();
      p.chunk_first_pos = dfirst.as<int32_t>();
      p.block_tables = dtable.as<int32_t>();
      p.max_blocks_per_seq = blocks_per_seq;
      p.max_chunk_len = len;
      p.scale = 0.088f;
      p.out = o.as<uint16_t>();
      const double ms =
          median_ms(5, reps, stream.get(), [&] { CHECK_OK(prefill_attention(p, stream.get())); });
      // A checksum of the output (FNV-1a of its bytes): two kernel versions that do the same
      // arithmetic print the same one (built with the same standard library: the block table's
      // shuffle is its).
      CHECK_OK(synchronize());
      std::vector<uint8_t> out_bytes(static_cast<size_t>(tokens * heads * head_dim * 2));
      CHECK_OK(copy_to_host(out_bytes.data(), o.data(), out_bytes.size()));
      uint64_t checksum = 1469598103934665603ull;
      for (const uint8_t byte : out_bytes) checksum = (checksum ^ byte) * 1099511628211ull;
      const double flops = 2.0 * seqs * len * (len + 1.0) * heads * head_dim;
      const double floor_ms = flops / (gemm_tflops * 1e12) * 1e3;
      std::printf(
          "prefill attention %d x %d tokens (one layer): %.1f us, %.0f TFLOP/s, %.0f%% of the matrix rate; "
          "output checksum %016llx\n",
          seqs, len, ms * 1e3, flops / (ms * 1e-3) / 1e12, 100.0 * floor_ms / ms,
          static_cast<unsigned long long>(checksum));
      Json row;
      row.add("seqs", seqs);
      row.add("len", len);
      row.add("ms", ms);
      row.add("floor_ms", floor_ms);
      row.add("checksum", fmt::format("{:016x}", checksum));
      rows += (rows.size() > 1 ? ", " : "") + row.str();
    }
    out.add_raw("prefill_attention", rows + "]");
  }
  if (attention_only) {
    CHECK_OK(synchronize());
    return write_json(json_path, out);
  }

  // 7. Sampling a token from Llama 3's 128256 logits a row: on the GPU (greedy, a plain tempered
  // draw, truncated draws), against copying the logits to host memory, which a draw made on the
  // host needs first (the host Sampler's own cost: docs/perf/cpu-engine.md).
  {
    const int64_t vocab = 128256;
    std::string rows = "[";
    for (const int64_t batch : {int64_t{1}, int64_t{16}, int64_t{64}}) {
      DeviceBuffer logits = value_or_die(DeviceBuffer::allocate(batch * vocab * 4), "allocate");
      DeviceBuffer scratch = value_or_die(DeviceBuffer::allocate(batch * vocab * 4), "allocate");
      DeviceBuffer draws = value_or_die(DeviceBuffer::allocate(batch * sizeof(SampleDraw)), "allocate");
      DeviceBuffer ws =
          value_or_die(DeviceBuffer::allocate(argmax_workspace_bytes(batch) + batch * 4), "allocate");
      CHECK_OK(fill_uniform_f32(logits.as<float>(), batch * vocab, 0.0f, 8.0f, 21, stream.get()));
      CHECK_OK(
          fill_bytes(ws.data(), 0, argmax_workspace_bytes(batch), stream.get()));  // argmax keeps it zero
      std::vector<float> host(static_cast<size_t>(batch * vocab));
      int32_t* tokens = ws.as<int32_t>() + argmax_workspace_bytes(batch) / 4;
      auto set_draws = [&](const SampleDraw& d) {
        std::vector<SampleDraw> all(static_cast<size_t>(batch), d);
        CHECK_OK(copy_to_device(draws.data(), all.data(), all.size() * sizeof(SampleDraw)));
      };
      Json row;
      row.add("batch", static_cast<double>(batch));
      const double greedy_ms = median_ms(3, reps, stream.get(), [&] {
        CHECK_OK(argmax(logits.as<float>(), batch, vocab, ws.data(), argmax_workspace_bytes(batch), tokens,
                        stream.get()));
      });
      set_draws({0.8f, 5, 0});
      const double plain_ms = median_ms(3, reps, stream.get(), [&] {
        CHECK_OK(copy_device_to_device(scratch.data(), logits.data(), batch * vocab * 4, stream.get()));
        CHECK_OK(gumbel_perturb(scratch.as<float>(), batch, vocab, draws.as<SampleDraw>(), stream.get()));
        CHECK_OK(argmax(scratch.as<float>(), batch, vocab, ws.data(), argmax_workspace_bytes(batch), tokens,
                        stream.get()));
      });
      const double copy_ms = median_ms(3, reps, stream.get(), [&] {
        CHECK_OK(copy_device_to_device(scratch.data(), logits.data(), batch * vocab * 4, stream.get()));
      });
      struct Limits {
        const char* name;
        SampleDraw draw;
      };
      const Limits limits[] = {{"top_p_0.9", {0.8f, 5, 0, 0, 0.9f, 0.0f}},
                               {"top_k_40", {0.8f, 5, 0, 40, 1.0f, 0.0f}},
                               {"min_p_0.05", {0.8f, 5, 0, 0, 1.0f, 0.05f}},
                               {"all_three", {0.8f, 5, 0, 40, 0.9f, 0.02f}}};
      std::printf(
          "sample batch %2ld x %ld logits: greedy %.1f us, plain tempered %.1f us (of which a %.1f us copy)",
          static_cast<long>(batch), static_cast<long>(vocab), greedy_ms * 1e3, plain_ms * 1e3, copy_ms * 1e3);
      row.add("greedy_ms", greedy_ms);
      row.add("plain_ms", plain_ms);
      for (const Limits& l : limits) {
        set_draws(l.draw);
        const double ms = median_ms(3, reps, stream.get(), [&] {
          CHECK_OK(sample_truncated(logits.as<float>(), batch, vocab, draws.as<SampleDraw>(), tokens,
                                    stream.get()));
        });
        std::printf(", %s %.1f us", l.name, ms * 1e3);
        row.add(std::string(l.name) + "_ms", ms);
      }
      const double to_host_ms = median_wall_ms(
          2, reps, [&] { CHECK_OK(copy_to_host(host.data(), logits.data(), host.size() * 4)); });
      std::printf("; logits to the host %.1f us\n", to_host_ms * 1e3);
      row.add("logits_to_host_ms", to_host_ms);
      rows += (rows.size() > 1 ? ", " : "") + row.str();
    }
    out.add_raw("sampling", rows + "]");
  }

  if (!model_name.empty())
    out.add_raw("model", model_section(model_name, quick, true, true, copy_gbps, gemm_tflops));

  CHECK_OK(synchronize());
  return write_json(json_path, out);
}
