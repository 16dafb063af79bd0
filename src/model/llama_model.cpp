#include "model/llama_model.h"

#include <fmt/format.h>

#include <cmath>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"

namespace pdserve {

namespace {

StatusOr<const GgufTensorInfo*> find_tensor(const GgufFile& f, const std::string& name,
                                            std::vector<int64_t> dims) {
  const GgufTensorInfo* t = f.find_tensor(name);
  if (!t) return invalid_argument(fmt::format("model file has no tensor '{}'", name));
  if (t->dims != dims) {
    return invalid_argument(fmt::format("tensor '{}' has shape [{}], expected [{}]", name,
                                        fmt::join(t->dims, ", "), fmt::join(dims, ", ")));
  }
  return t;
}

StatusOr<cpu::Weights> matrix(const GgufFile& f, const std::string& name, int64_t cols, int64_t rows) {
  PD_ASSIGN_OR_RETURN(const GgufTensorInfo* t, find_tensor(f, name, {cols, rows}));
  if (!cpu::is_supported_weight_type(t->type)) {
    return unimplemented(
        fmt::format("tensor '{}' has type {}, which the CPU engine does not compute with "
                    "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                    name, ggml_type_name(t->type)));
  }
  if (cols % 32 != 0)
    return unimplemented(fmt::format("tensor '{}' has rows of {} (not a multiple of 32)", name, cols));
  return cpu::Weights{t->type, t->data, rows, cols};
}

StatusOr<const float*> vector_f32(const GgufFile& f, const std::string& name, int64_t n) {
  PD_ASSIGN_OR_RETURN(const GgufTensorInfo* t, find_tensor(f, name, {n}));
  if (t->type != GgmlType::kF32) {
    return unimplemented(
        fmt::format("tensor '{}' has type {}; norms and biases must be F32", name, ggml_type_name(t->type)));
  }
  return reinterpret_cast<const float*>(t->data);
}

}  // namespace

StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::load(std::shared_ptr<const GgufFile> file) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  const GgufFile& f = *file;
  PD_ASSIGN_OR_RETURN(m->config_, ModelConfig::from_gguf(f));
  m->fingerprint_ = f.fingerprint();
  const ModelConfig& c = m->config_;
  const int64_t d = c.hidden_size;
  PD_ASSIGN_OR_RETURN(m->token_embd_, matrix(f, "token_embd.weight", d, c.vocab_size));
  PD_ASSIGN_OR_RETURN(m->output_norm_, vector_f32(f, "output_norm.weight", d));
  if (c.tied_embeddings) {
    m->output_ = m->token_embd_;
  } else {
    PD_ASSIGN_OR_RETURN(m->output_, matrix(f, "output.weight", d, c.vocab_size));
  }
  if (const GgufTensorInfo* rf = f.find_tensor("rope_freqs.weight")) {
    PD_ASSIGN_OR_RETURN(const float* ff, vector_f32(f, "rope_freqs.weight", c.rope_dim / 2));
    (void)rf;
    m->rope_freq_factors_.assign(ff, ff + c.rope_dim / 2);
  } else if (c.rope_scaling.factor > 0) {
    m->rope_freq_factors_ = llama3_freq_factors(c);
  }
  m->layers_.resize(static_cast<size_t>(c.num_layers));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    Layer& l = m->layers_[static_cast<size_t>(i)];
    const std::string p = fmt::format("blk.{}.", i);
    PD_ASSIGN_OR_RETURN(l.attn_norm, vector_f32(f, p + "attn_norm.weight", d));
    PD_ASSIGN_OR_RETURN(l.ffn_norm, vector_f32(f, p + "ffn_norm.weight", d));
    PD_ASSIGN_OR_RETURN(l.wq, matrix(f, p + "attn_q.weight", d, c.q_dim()));
    PD_ASSIGN_OR_RETURN(l.wk, matrix(f, p + "attn_k.weight", d, c.kv_dim()));
    PD_ASSIGN_OR_RETURN(l.wv, matrix(f, p + "attn_v.weight", d, c.kv_dim()));
    PD_ASSIGN_OR_RETURN(l.wo, matrix(f, p + "attn_output.weight", c.q_dim(), d));
    PD_ASSIGN_OR_RETURN(l.w_gate, matrix(f, p + "ffn_gate.weight", d, c.ffn_size));
    PD_ASSIGN_OR_RETURN(l.w_up, matrix(f, p + "ffn_up.weight", d, c.ffn_size));
    PD_ASSIGN_OR_RETURN(l.w_down, matrix(f, p + "ffn_down.weight", c.ffn_size, d));
    if (c.has_qkv_bias) {
      PD_ASSIGN_OR_RETURN(l.bq, vector_f32(f, p + "attn_q.bias", c.q_dim()));
      PD_ASSIGN_OR_RETURN(l.bk, vector_f32(f, p + "attn_k.bias", c.kv_dim()));
      PD_ASSIGN_OR_RETURN(l.bv, vector_f32(f, p + "attn_v.bias", c.kv_dim()));
    }
  }
  m->file_ = std::move(file);
  m->to_compute_layout();
  return m;
}

void LlamaModel::to_compute_layout() {
  std::vector<cpu::Weights*> all = {&token_embd_};
  if (!config_.tied_embeddings) all.push_back(&output_);
  for (Layer& l : layers_) {
    for (cpu::Weights* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) all.push_back(w);
  }
  auto aligned = [](size_t n) { return (n + 63) / 64 * 64; };
  size_t total = 0;
  for (const cpu::Weights* w : all) total += aligned(cpu::compute_bytes(w->type, w->rows, w->cols));
  weights_ = cpu::PageBuffer(total);
  ThreadPool pool;
  size_t at = 0;
  for (cpu::Weights* w : all) {
    const cpu::Weights src = *w;
    *w = cpu::to_compute_layout(src, weights_.data() + at, pool);
    at += aligned(cpu::compute_bytes(w->type, w->rows, w->cols));
    // The file's copy is no longer read: let its pages go (they stay in the page cache).
    file_->release_pages(src.data, cpu::row_bytes(src.type, src.cols) * static_cast<size_t>(src.rows));
  }
  if (config_.tied_embeddings) output_ = token_embd_;
}

Status LlamaModel::forward(const ForwardBatch& batch, KvStorage& kv, ThreadPool& pool, float* logits) {
  std::lock_guard<std::mutex> lock(forward_mu_);
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  const int64_t d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), ffn = c.ffn_size;
  const int32_t hd = c.head_dim, half_rope = c.rope_dim / 2;
  if (T == 0) return ok_status();

  // Per token: its position, its chunk; validate everything that indexes memory.
  std::vector<int32_t> pos(static_cast<size_t>(T)), chunk_of(static_cast<size_t>(T));
  int64_t at = 0;
  int32_t max_keys = 0;
  int64_t num_logits = 0;
  for (size_t ci = 0; ci < batch.chunks.size(); ++ci) {
    const SequenceChunk& ch = batch.chunks[ci];
    int64_t end = int64_t{ch.first_position} + ch.num_tokens;
    if (ch.num_tokens <= 0 || ch.first_position < 0 || at + ch.num_tokens > T) {
      return invalid_argument("forward: chunk token ranges do not match the batch");
    }
    if (end > c.context_length) {
      return out_of_range(fmt::format("forward: position {} is beyond the model's context length {}", end - 1,
                                      c.context_length));
    }
    if (static_cast<int64_t>(ch.block_table.size()) * kv.block_size() < end) {
      return invalid_argument("forward: block table too short for the chunk");
    }
    for (int64_t b = 0; b < (end + kv.block_size() - 1) / kv.block_size(); ++b) {
      int32_t id = ch.block_table[static_cast<size_t>(b)];
      if (id < 0 || id >= kv.num_blocks())
        return invalid_argument(fmt::format("forward: block id {} out of range", id));
    }
    for (int32_t i = 0; i < ch.num_tokens; ++i) {
      pos[static_cast<size_t>(at + i)] = ch.first_position + i;
      chunk_of[static_cast<size_t>(at + i)] = static_cast<int32_t>(ci);
    }
    max_keys = std::max(max_keys, static_cast<int32_t>(end));
    num_logits += ch.want_logits ? 1 : 0;
    at += ch.num_tokens;
  }
  if (at != T) return invalid_argument("forward: chunks do not cover the batch");
  for (int32_t tok : batch.tokens) {
    if (tok < 0 || tok >= c.vocab_size) {
      return invalid_argument(
          fmt::format("forward: token id {} outside the vocabulary (size {})", tok, c.vocab_size));
    }
  }

  auto sz = [](int64_t n) { return static_cast<size_t>(n); };
  x_.resize(sz(T * d));
  xn_.resize(sz(T * std::max(d, qd)));
  q_.resize(sz(T * qd));
  k_.resize(sz(T * kvd));
  v_.resize(sz(T * kvd));
  attn_.resize(sz(T * qd));
  gate_.resize(sz(T * ffn));
  up_.resize(sz(T * ffn));
  tmp_.resize(sz(T * d));
  rope_cos_.resize(sz(T * half_rope));
  rope_sin_.resize(sz(T * half_rope));
  const int nthreads = pool.num_threads();
  scores_.resize(sz(int64_t{nthreads} * (c.num_heads / c.num_kv_heads) * max_keys));

  pool.run([&](int idx, int n) {
    for (int64_t t = idx; t < T; t += n) {
      cpu::dequantize_weight_row(token_embd_, batch.tokens[sz(t)], x_.data() + t * d);
      cpu::rope_angles(pos[sz(t)], c.rope_dim, c.rope_theta, rope_freq_factors_,
                       rope_cos_.data() + t * half_rope, rope_sin_.data() + t * half_rope);
    }
  });

  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool neox = c.rope_ordering == RopeOrdering::kNeox;
  const int32_t group = c.num_heads / c.num_kv_heads;

  for (int32_t li = 0; li < c.num_layers; ++li) {
    const Layer& L = layers_[sz(li)];
    cpu::PagedKvLayer kvl = kv.layer(li);

    // The previous layer's FFN residual, the attention norm and quantization in one region.
    acts_.prepare_rows(xn_.data(), T, d, pool, [&](int64_t t) {
      if (li > 0) cpu::add_inplace(x_.data() + t * d, tmp_.data() + t * d, d);
      cpu::rms_norm(x_.data() + t * d, L.attn_norm, c.rms_norm_eps, d, xn_.data() + t * d);
    });
    const cpu::MatmulTarget qkv[] = {
        {&L.wq, q_.data(), qd}, {&L.wk, k_.data(), kvd}, {&L.wv, v_.data(), kvd}};
    cpu::matmul_many(qkv, acts_, pool);

    // Biases, rotary embedding, and the new K/V rows into the cache.
    pool.run([&](int idx, int n) {
      for (int64_t t = idx; t < T; t += n) {
        float* qt = q_.data() + t * qd;
        float* kt = k_.data() + t * kvd;
        float* vt = v_.data() + t * kvd;
        if (L.bq) {
          cpu::add_inplace(qt, L.bq, qd);
          cpu::add_inplace(kt, L.bk, kvd);
          cpu::add_inplace(vt, L.bv, kvd);
        }
        const float* cs = rope_cos_.data() + t * half_rope;
        const float* sn = rope_sin_.data() + t * half_rope;
        cpu::rope_apply(qt, c.num_heads, hd, c.rope_dim, neox, cs, sn);
        cpu::rope_apply(kt, c.num_kv_heads, hd, c.rope_dim, neox, cs, sn);
        const SequenceChunk& ch = batch.chunks[sz(chunk_of[sz(t)])];
        int32_t p = pos[sz(t)];
        int64_t row = kvl.offset(ch.block_table, p, 0);
        cpu::f32_to_f16(kt, kvl.k + row, kvd);
        cpu::f32_to_f16(vt, kvl.v + row, kvd);
      }
    });

    // Attention. Both ways give the same bits per (token, head): with enough tokens, the query
    // heads of a KV head go together (K/V rows read once for the group); otherwise every
    // (token, head) pair separately, which spreads a decode step over more threads.
    if (T * c.num_kv_heads >= 2 * int64_t{nthreads}) {
      pool.run([&](int idx, int n) {
        float* scores = scores_.data() + int64_t{idx} * group * max_keys;
        for (int64_t w = idx; w < T * c.num_kv_heads; w += n) {
          int64_t t = w / c.num_kv_heads;
          int32_t g = static_cast<int32_t>(w % c.num_kv_heads);
          const SequenceChunk& ch = batch.chunks[sz(chunk_of[sz(t)])];
          int64_t first = t * qd + int64_t{g} * group * hd;
          cpu::attention_heads(q_.data() + first, group, kvl, ch.block_table, pos[sz(t)] + 1, g, attn_scale,
                               scores, attn_.data() + first);
        }
      });
    } else {
      pool.run([&](int idx, int n) {
        float* scores = scores_.data() + int64_t{idx} * group * max_keys;
        for (int64_t w = idx; w < T * c.num_heads; w += n) {
          int64_t t = w / c.num_heads;
          int32_t h = static_cast<int32_t>(w % c.num_heads);
          const SequenceChunk& ch = batch.chunks[sz(chunk_of[sz(t)])];
          cpu::attention_head(q_.data() + t * qd + int64_t{h} * hd, kvl, ch.block_table, pos[sz(t)] + 1,
                              h / group, attn_scale, scores, attn_.data() + t * qd + int64_t{h} * hd);
        }
      });
    }
    acts_.prepare(attn_.data(), T, qd, pool);
    cpu::matmul(L.wo, acts_, tmp_.data(), d, pool);

    acts_.prepare_rows(xn_.data(), T, d, pool, [&](int64_t t) {
      cpu::add_inplace(x_.data() + t * d, tmp_.data() + t * d, d);
      cpu::rms_norm(x_.data() + t * d, L.ffn_norm, c.rms_norm_eps, d, xn_.data() + t * d);
    });
    const cpu::MatmulTarget gate_up[] = {{&L.w_gate, gate_.data(), ffn}, {&L.w_up, up_.data(), ffn}};
    cpu::matmul_many(gate_up, acts_, pool);
    acts_.prepare_rows(gate_.data(), T, ffn, pool, [&](int64_t t) {
      cpu::silu_mul(gate_.data() + t * ffn, up_.data() + t * ffn, ffn, gate_.data() + t * ffn);
    });
    cpu::matmul(L.w_down, acts_, tmp_.data(), d, pool);
    // The FFN residual is added by the next layer's first region (or below, for logits rows).
    if (batch.after_layer) batch.after_layer(li);
  }

  if (num_logits == 0) return ok_status();
  final_.resize(sz(num_logits * d));
  int64_t row = 0;
  at = 0;
  for (const SequenceChunk& ch : batch.chunks) {
    at += ch.num_tokens;
    if (!ch.want_logits) continue;
    cpu::add_inplace(x_.data() + (at - 1) * d, tmp_.data() + (at - 1) * d, d);
    cpu::rms_norm(x_.data() + (at - 1) * d, output_norm_, c.rms_norm_eps, d, final_.data() + row * d);
    ++row;
  }
  acts_.prepare(final_.data(), num_logits, d, pool);
  cpu::matmul(output_, acts_, logits, c.vocab_size, pool);
  return ok_status();
}

}  // namespace pdserve
