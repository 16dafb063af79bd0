#include "engine/engine.h"

#include <fmt/format.h>

#include <chrono>

#include "common/check.h"
#include "common/log.h"
#include "engine/text_stream.h"

namespace pdserve {

struct Engine::Active {
  Active(EngineRequest r, OutputSink s, std::shared_ptr<RequestHandle> h, const Tokenizer& tok)
      : request(std::move(r)),
        sink(std::move(s)),
        handle(std::move(h)),
        sampler(request.sampling),
        stream(tok, request.stop, request.ignore_eos, request.max_tokens) {}
  EngineRequest request;
  OutputSink sink;
  std::shared_ptr<RequestHandle> handle;
  Sampler sampler;
  TextStream stream;
  int32_t cached_prompt_tokens = 0;
};

Status EngineOptions::validate() const {
  if (block_size < 1)
    return invalid_argument(fmt::format("block size must be at least 1, got {}", block_size));
  if (num_blocks < 1)
    return invalid_argument(fmt::format("the KV cache needs at least 1 block, got {}", num_blocks));
  if (step_token_budget < 1) {
    return invalid_argument(
        fmt::format("the step token budget must be at least 1, got {}", step_token_budget));
  }
  if (max_running < 1)
    return invalid_argument(fmt::format("max running must be at least 1, got {}", max_running));
  if (max_waiting < 0)
    return invalid_argument(fmt::format("max waiting must not be negative, got {}", max_waiting));
  if (max_context < 0)
    return invalid_argument(fmt::format("max context must not be negative, got {}", max_context));
  return ok_status();
}

Engine::Engine(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, const EngineOptions& options)
    : model_(model),
      tokenizer_(tokenizer),
      pool_(pool),
      options_(options),
      max_context_(options.max_context > 0 ? std::min(options.max_context, model.config().context_length)
                                           : model.config().context_length),
      kv_storage_(model.config(), options.num_blocks, options.block_size),
      kv_(KvCacheConfig{options.num_blocks, options.block_size, options.prefix_caching, nullptr}),
      scheduler_(kv_, SchedulerOptions{options.step_token_budget, options.max_running}) {
  Status st = options.validate();
  PD_CHECK_MSG(st.ok(), st.message().c_str());
  metrics_.kv = kv_.stats();
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Status Engine::validate(const EngineRequest& r) const {
  PD_RETURN_IF_ERROR(r.sampling.validate());
  const int64_t n_prompt = static_cast<int64_t>(r.prompt.size());
  if (n_prompt == 0) return invalid_argument("the prompt is empty");
  if (r.max_tokens < 1)
    return invalid_argument(fmt::format("max_tokens must be at least 1, got {}", r.max_tokens));
  const int32_t vocab = model_.config().vocab_size;
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= vocab) {
      return invalid_argument(fmt::format("token id {} is outside the vocabulary (0..{})", t, vocab - 1));
    }
  }
  if (n_prompt + r.max_tokens > max_context_) {
    return invalid_argument(
        fmt::format("the prompt ({} tokens) plus max_tokens ({}) is {} tokens, beyond this server's context "
                    "of {} tokens; "
                    "shorten the prompt or lower max_tokens",
                    n_prompt, r.max_tokens, n_prompt + r.max_tokens, max_context_));
  }
  if (!scheduler_.fits_alone(n_prompt + r.max_tokens)) {
    return invalid_argument(fmt::format(
        "the prompt ({} tokens) plus max_tokens ({}) needs more KV cache than this server has ({} tokens); "
        "lower max_tokens or start the server with a larger --kv-cache-memory",
        n_prompt, r.max_tokens, int64_t{options_.num_blocks} * options_.block_size));
  }
  for (const auto& s : r.stop) {
    if (s.empty()) return invalid_argument("stop strings must not be empty");
  }
  return ok_status();
}

StatusOr<std::shared_ptr<RequestHandle>> Engine::submit(EngineRequest request, OutputSink sink) {
  PD_RETURN_IF_ERROR(validate(request));
  auto handle = std::make_shared<RequestHandle>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the engine is shutting down");
    if (static_cast<int64_t>(incoming_.size()) + metrics_.waiting >= options_.max_waiting) {
      return resource_exhausted(
          fmt::format("{} requests are already waiting; retry later", options_.max_waiting));
    }
    incoming_.push_back(Pending{std::move(request), std::move(sink), handle});
  }
  cv_.notify_one();
  return handle;
}

EngineMetrics Engine::metrics() const {
  std::lock_guard<std::mutex> lock(mu_);
  return metrics_;
}

void Engine::loop() {
  for (;;) {
    std::deque<Pending> incoming;
    bool stopping;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !incoming_.empty() || !scheduler_.idle(); });
      incoming.swap(incoming_);
      stopping = stop_;
      metrics_.waiting = scheduler_.num_waiting();
    }
    for (Pending& p : incoming) {
      SequenceId id = next_id_++;
      std::vector<int32_t> prompt = p.request.prompt;
      active_.emplace(id, std::make_unique<Active>(std::move(p.request), std::move(p.sink),
                                                   std::move(p.handle), tokenizer_));
      scheduler_.add(id, std::move(prompt));
    }
    if (stopping) {
      std::vector<SequenceId> ids;
      for (auto& [id, a] : active_) ids.push_back(id);
      for (SequenceId id : ids) {
        EngineOutput out;
        out.finish_reason = "cancelled";
        finish(id, std::move(out));
      }
      publish_metrics(0);
      return;
    }
    step();
  }
}

void Engine::step() {
  auto t0 = std::chrono::steady_clock::now();
  // Cancellations free their blocks before anything is planned.
  std::vector<SequenceId> cancelled;
  for (auto& [id, a] : active_) {
    if (a->handle->cancelled()) cancelled.push_back(id);
  }
  for (SequenceId id : cancelled) {
    EngineOutput out;
    out.finish_reason = "cancelled";
    finish(id, std::move(out));
  }

  StepPlan plan = scheduler_.plan();
  for (auto& [id, st] : plan.failed) {
    EngineOutput out;
    out.finish_reason = "error";
    out.error = st;
    finish(id, std::move(out));
  }
  if (plan.empty()) {
    publish_metrics(0);
    if (!scheduler_.idle() && scheduler_.num_running() == 0) {
      // Nothing can run although requests wait: validate() makes this impossible; do not spin.
      PD_LOG_ERROR("engine: {} requests wait but none can be admitted", scheduler_.num_waiting());
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return;
  }

  ForwardBatch batch;
  batch_tokens_.clear();
  int32_t num_logits = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    auto toks = scheduler_.tokens(c.seq).subspan(static_cast<size_t>(c.first_position),
                                                 static_cast<size_t>(c.num_tokens));
    batch_tokens_.insert(batch_tokens_.end(), toks.begin(), toks.end());
    batch.chunks.push_back({c.first_position, c.num_tokens, scheduler_.block_table(c.seq), c.want_logits});
    num_logits += c.want_logits ? 1 : 0;
  }
  batch.tokens = batch_tokens_;
  const size_t vocab = static_cast<size_t>(model_.config().vocab_size);
  if (logits_.size() < static_cast<size_t>(num_logits) * vocab)
    logits_.resize(static_cast<size_t>(num_logits) * vocab);
  Status st = model_.forward(batch, kv_storage_, pool_, logits_.data());
  if (!st.ok()) {
    // A forward error is a bug or a corrupt model; fail this step's requests, keep serving.
    PD_LOG_ERROR("engine: forward pass failed: {}", st.message());
    for (const ScheduledChunk& c : plan.chunks) {
      if (!active_.contains(c.seq)) continue;
      EngineOutput out;
      out.finish_reason = "error";
      out.error = st;
      finish(c.seq, std::move(out));
    }
    publish_metrics(0);
    return;
  }
  scheduler_.complete(plan);
  computed_tokens_total_ += plan.num_tokens();

  size_t row = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    if (!c.want_logits) continue;
    float* lg = logits_.data() + row * vocab;
    ++row;
    Active& a = *active_.at(c.seq);
    if (a.stream.num_tokens() == 0) a.cached_prompt_tokens = scheduler_.num_cached_prompt_tokens(c.seq);
    SampleResult r = a.sampler.sample(std::span<float>(lg, vocab), scheduler_.tokens(c.seq));
    scheduler_.append_token(c.seq, r.token);
    ++generated_tokens_total_;
    TextStream::Update u = a.stream.feed(r.token);
    EngineOutput out;
    out.text = std::move(u.text);
    GeneratedToken g;
    g.id = r.token;
    if (a.request.logprobs) {
      g.logprob = r.logprob;
      g.top = std::move(r.top);
    }
    out.tokens.push_back(std::move(g));
    if (u.done) {
      out.finish_reason = u.finish_reason;
      finish(c.seq, std::move(out));
    } else {
      a.sink(std::move(out));
    }
  }
  ++steps_total_;
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  step_seconds_total_ += secs;
  publish_metrics(secs);
}

void Engine::finish(SequenceId id, EngineOutput&& last) {
  auto it = active_.find(id);
  PD_CHECK(it != active_.end());
  Active& a = *it->second;
  if (last.finish_reason == "cancelled" || last.finish_reason == "error") {
    TextStream::Update u = a.stream.finish(last.finish_reason);
    last.text += u.text;
  }
  last.finished = true;
  last.prompt_tokens = static_cast<int32_t>(a.request.prompt.size());
  last.completion_tokens = a.stream.num_tokens();
  last.cached_prompt_tokens = a.cached_prompt_tokens;
  prompt_tokens_total_ += last.prompt_tokens;
  ++finished_by_reason_[last.finish_reason];
  scheduler_.remove(id);
  OutputSink sink = std::move(a.sink);
  active_.erase(it);
  // Metrics first, so whoever sees the final output also sees the blocks freed.
  publish_metrics(0);
  sink(std::move(last));
}

void Engine::publish_metrics(double step_seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  metrics_.running = scheduler_.num_running();
  metrics_.waiting = scheduler_.num_waiting();
  metrics_.kv = kv_.stats();
  metrics_.preemptions_total = scheduler_.num_preemptions();
  metrics_.prompt_tokens_total = prompt_tokens_total_;
  metrics_.generated_tokens_total = generated_tokens_total_;
  metrics_.computed_tokens_total = computed_tokens_total_;
  metrics_.steps_total = steps_total_;
  metrics_.step_seconds_total = step_seconds_total_;
  if (step_seconds > 0) metrics_.last_step_seconds = step_seconds;
  metrics_.finished_by_reason = finished_by_reason_;
}

}  // namespace pdserve
