#include "engine/engine.h"

#include <fmt/format.h>

#include <algorithm>
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
        stream(tok, request.stop, request.ignore_eos, request.max_tokens) {
    if (request.response_format == ResponseFormat::kJsonObject) json.emplace();
  }
  EngineRequest request;
  OutputSink sink;
  std::shared_ptr<RequestHandle> handle;
  Sampler sampler;
  TextStream stream;
  std::optional<JsonPrefix> json;  // JSON mode: the text so far
  int32_t cached_prompt_tokens = 0;
  // Decode role: a handed-off request.
  std::optional<EngineHandoff> handoff;
  PulledCallback on_pulled;
  TransferId transfer = 0;
  std::chrono::steady_clock::time_point pull_started;
  bool pulling = false;
  bool pull_cancelled = false;  // the puller was told
  bool suspect_kv = false;      // its logits held no usable value: its blocks leave the prefix cache
  // Prefill role: the send buffer taken at submit() until the KV goes into it; the layer-wise
  // send of this step (begin_early_handoff), and whether a layer failed to go.
  std::optional<KvSendBuffer> send;
  std::optional<LayerWiseSend> early;
  Status early_error;
};

std::string_view engine_role_name(EngineRole role) {
  switch (role) {
    case EngineRole::kMixed: return "mixed";
    case EngineRole::kPrefill: return "prefill";
    case EngineRole::kDecode: return "decode";
  }
  return "unknown";
}

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
  if (role == EngineRole::kPrefill) {
    if (deadline_priority_ms < 0)
      return invalid_argument(
          fmt::format("the deadline priority window must not be negative, got {} ms", deadline_priority_ms));
    if (prefill_slots < 0)
      return invalid_argument(fmt::format("prefill slots must not be negative, got {}", prefill_slots));
    if (kv_send == nullptr) return invalid_argument("a prefill instance needs a KV send pool");
    if (handoff_lease_ms < 1)
      return invalid_argument(fmt::format("the handoff lease must be positive, got {} ms", handoff_lease_ms));
  }
  if (role == EngineRole::kDecode) {
    if (decode_pending < 1)
      return invalid_argument(
          fmt::format("a decode needs a pending queue of at least 1, got {}", decode_pending));
    if (kv_puller == nullptr) return invalid_argument("a decode instance needs a KV puller");
  }
  return ok_status();
}

Engine::Engine(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, const EngineOptions& options)
    : Engine(std::make_unique<CpuExecutor>(model, pool, options.num_blocks, options.block_size), tokenizer,
             options) {}

Engine::Engine(std::unique_ptr<ModelExecutor> executor, const Tokenizer& tokenizer,
               const EngineOptions& options)
    : executor_(std::move(executor)),
      config_(executor_->config()),
      tokenizer_(tokenizer),
      options_(options),
      max_context_(options.max_context > 0 ? std::min(options.max_context, config_.context_length)
                                           : config_.context_length),
      kv_(KvCacheConfig{options.num_blocks, options.block_size, options.prefix_caching, nullptr}),
      scheduler_(kv_, SchedulerOptions{options.step_token_budget, options.max_running}) {
  Status st = options.validate();
  PD_CHECK_MSG(st.ok(), st.message().c_str());
  metrics_.kv = kv_.stats();
  const ModelConfig& c = config_;
  KvStorage* host = executor_->host_kv();
  const std::optional<DeviceKv> device_kv = executor_->device_kv();
  PD_CHECK_MSG(host != nullptr || device_kv.has_value() || options.role == EngineRole::kMixed,
               "a prefill or decode engine needs a KV cache a transport can move");
  if (host != nullptr) {
    PD_CHECK(host->num_blocks() == options.num_blocks && host->block_size() == options.block_size);
    kv_view_ = PagedKvView{host->block_data(0), host->block_bytes(), options.num_blocks, options.block_size,
                           KvLayout{executor_->fingerprint(), KvDtype::kF16, c.num_layers, c.kv_dim()}};
  } else if (device_kv.has_value()) {
    kv_view_ = PagedKvView{
        device_kv->base, static_cast<size_t>(options.block_size) * static_cast<size_t>(c.kv_dim()) * 2,
        options.num_blocks, options.block_size,
        KvLayout{executor_->fingerprint(), device_kv->fp16 ? KvDtype::kF16 : KvDtype::kBF16, c.num_layers,
                 c.kv_dim()}};
    kv_view_.memory = KvMemory::kCuda;
    kv_view_.cuda_device = device_kv->device;
    kv_view_.num_kv_heads = c.num_kv_heads;
    kv_view_.layer_bytes = device_kv->layer_bytes;
    kv_view_.v_offset_bytes = device_kv->v_offset_bytes;
    kv_view_.cuda_stream = device_kv->stream;
    Status view_ok = kv_view_.validate();
    PD_CHECK_MSG(view_ok.ok(), view_ok.message().c_str());
  } else {
    kv_view_.layout = KvLayout{executor_->fingerprint(), KvDtype::kF16, c.num_layers, c.kv_dim()};
  }
  if (options.role == EngineRole::kPrefill && options.layer_wise_kv) {
    layer_wise_ = executor_->reports_layers() && options.kv_send->supports_layer_wise() &&
                  options.kv_send->memory() == kv_view_.memory;
    if (!layer_wise_)
      PD_LOG_WARN(
          "engine: layer-wise KV transfer needs the inproc, shm or tcp transport (ucx and cuda-ipc send "
          "the KV whole; a GPU instance stages it through a page-locked shm or tcp send pool), and this "
          "is {} over {}: the KV leaves whole after the first token",
          executor_->device(), transport_kind_name(options.kv_send->kind()));
  }
  if (options.role == EngineRole::kDecode) {
    pull_listener_ = options.kv_puller->add_done_listener([this] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        pull_ended_ = true;
      }
      cv_.notify_all();
    });
  }
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (pull_listener_ != 0) {
    options_.kv_puller->remove_done_listener(pull_listener_);
    pull_listener_ = 0;
  }
}

namespace {

void add_kv(KvCacheStats& a, const KvCacheStats& b) {
  a.num_blocks_total += b.num_blocks_total;
  a.num_blocks_used += b.num_blocks_used;
  a.num_blocks_free += b.num_blocks_free;
  a.num_blocks_cached_evictable += b.num_blocks_cached_evictable;
  a.num_blocks_cached += b.num_blocks_cached;
  a.num_sequences += b.num_sequences;
  a.prefix_lookups_total += b.prefix_lookups_total;
  a.prefix_queried_tokens_total += b.prefix_queried_tokens_total;
  a.prefix_hit_tokens_total += b.prefix_hit_tokens_total;
  a.prefix_conflicts_total += b.prefix_conflicts_total;
  a.evictions_total += b.evictions_total;
}

}  // namespace

void add_metrics(EngineMetrics& a, const EngineMetrics& b) {
  a.running += b.running;
  a.waiting += b.waiting;
  add_kv(a.kv, b.kv);
  a.preemptions_total += b.preemptions_total;
  a.prompt_tokens_total += b.prompt_tokens_total;
  a.generated_tokens_total += b.generated_tokens_total;
  a.computed_tokens_total += b.computed_tokens_total;
  a.nonfinite_logits_total += b.nonfinite_logits_total;
  a.prefill_slots_in_use += b.prefill_slots_in_use;
  a.handoffs_outstanding += b.handoffs_outstanding;
  a.handoffs_total += b.handoffs_total;
  a.layer_wise_handoffs_total += b.layer_wise_handoffs_total;
  a.handoff_leases_expired_total += b.handoff_leases_expired_total;
  a.priority_refusals_total += b.priority_refusals_total;
  a.decode_pending += b.decode_pending;
  a.kv_pulls_in_flight += b.kv_pulls_in_flight;
  a.kv_pulls_failed_total += b.kv_pulls_failed_total;
  a.kv_pulls_total += b.kv_pulls_total;
  a.kv_pulled_bytes_total += b.kv_pulled_bytes_total;
  a.kv_pull_microseconds_total += b.kv_pull_microseconds_total;
  a.steps_total += b.steps_total;
  a.step_seconds_total += b.step_seconds_total;
  a.last_step_seconds = std::max(a.last_step_seconds, b.last_step_seconds);
  a.gateway_waiting += b.gateway_waiting;
  a.gateway_timeouts_total += b.gateway_timeouts_total;
  a.gateway_rejections_total += b.gateway_rejections_total;
  a.gateway_room_rejections_total += b.gateway_room_rejections_total;
  a.gateway_prefill_retries_total += b.gateway_prefill_retries_total;
  for (const auto& [reason, n] : b.finished_by_reason) a.finished_by_reason[reason] += n;
  a.scenarios.insert(a.scenarios.end(), b.scenarios.begin(), b.scenarios.end());
}

Status check_request_limits(const EngineRequest& r, int32_t max_context) {
  PD_RETURN_IF_ERROR(r.sampling.validate());
  const int64_t n_prompt = static_cast<int64_t>(r.prompt.size());
  if (n_prompt == 0) return invalid_argument("the prompt is empty");
  if (r.max_tokens < 1)
    return invalid_argument(fmt::format("max_tokens must be at least 1, got {}", r.max_tokens));
  if (n_prompt + r.max_tokens > max_context) {
    return invalid_argument(
        fmt::format("the prompt ({} tokens) plus max_tokens ({}) is {} tokens, beyond this server's context "
                    "of {} tokens; shorten the prompt or lower max_tokens",
                    n_prompt, r.max_tokens, n_prompt + r.max_tokens, max_context));
  }
  for (const auto& s : r.stop) {
    if (s.empty()) return invalid_argument("stop strings must not be empty");
  }
  return ok_status();
}

Status Engine::validate(const EngineRequest& r) const {
  PD_RETURN_IF_ERROR(check_request_limits(r, max_context_));
  const int64_t n_prompt = static_cast<int64_t>(r.prompt.size());
  const int32_t vocab = config_.vocab_size;
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= vocab) {
      return invalid_argument(fmt::format("token id {} is outside the vocabulary (0..{})", t, vocab - 1));
    }
  }
  // (Ascending: the last is the largest.)
  if (!r.sampling.logit_bias.empty() && r.sampling.logit_bias.back().token >= vocab) {
    return invalid_argument(fmt::format("logit_bias names token id {}, outside the vocabulary (0..{})",
                                        r.sampling.logit_bias.back().token, vocab - 1));
  }
  if (r.response_format == ResponseFormat::kJsonObject)
    PD_RETURN_IF_ERROR(check_json_mode(json_vocab(), vocab, r.ignore_eos));
  if (!scheduler_.fits_alone(n_prompt + r.max_tokens)) {
    return invalid_argument(fmt::format(
        "the prompt ({} tokens) plus max_tokens ({}) needs more KV cache than this server has ({} tokens); "
        "lower max_tokens or start the server with a larger --kv-cache-memory",
        n_prompt, r.max_tokens, int64_t{options_.num_blocks} * options_.block_size));
  }
  return ok_status();
}

StatusOr<std::shared_ptr<RequestHandle>> Engine::submit(EngineRequest request, OutputSink sink,
                                                        std::shared_ptr<RequestHandle> handle) {
  if (options_.role == EngineRole::kDecode) {
    return failed_precondition("this is a decode instance: it continues handed-off requests only");
  }
  PD_RETURN_IF_ERROR(validate(request));
  if (!handle) handle = std::make_shared<RequestHandle>();
  const auto now = options_.clock ? options_.clock() : std::chrono::steady_clock::now();
  // A gateway's deadline for this request to be accepted (deadline_priority_ms).
  const bool dated = options_.role == EngineRole::kPrefill && options_.deadline_priority_ms > 0 &&
                     request.wait_budget_us >= 0;
  // (At most a day ahead: a peer's value must not overflow the clock.)
  const auto deadline =
      now + std::chrono::microseconds(dated ? std::min<int64_t>(request.wait_budget_us, 86'400'000'000) : 0);
  const bool slotted = options_.role == EngineRole::kPrefill && options_.prefill_slots > 0;
  bool queued_here = false;
  Status queue_status = ok_status();
  std::vector<Pending> dropped;  // cancelled while queued: ended outside the lock
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the engine is shutting down");
    // The baseline's FIFO: behind whatever already waits, even when a slot has just freed (the
    // head takes it: admit_slot_queue).
    if (slotted && request.queue_if_full &&
        (slots_in_use_ >= options_.prefill_slots || !slot_queue_.empty())) {
      // Requests cancelled while they wait leave the queue now, not only at its head.
      for (auto it = slot_queue_.begin(); it != slot_queue_.end();) {
        if (it->handle->cancelled()) {
          dropped.push_back(std::move(*it));
          it = slot_queue_.erase(it);
        } else {
          ++it;
        }
      }
      if (static_cast<int64_t>(slot_queue_.size()) >= options_.max_waiting) {
        queue_status = resource_exhausted(
            fmt::format("{} requests already wait in this prefill's queue; try another prefill or later",
                        slot_queue_.size()));
      } else {
        slot_queue_.push_back(
            Pending{std::move(request), std::move(sink), handle, std::nullopt, nullptr, std::nullopt});
      }
      sync_transfer_metrics();
      queued_here = true;
    } else if (slotted && slots_in_use_ >= options_.prefill_slots) {
      if (dated) note_refused_locked(deadline, request.wait_queue, now);
      return resource_exhausted(
          fmt::format("all {} prefill slots are held; try another prefill or later", options_.prefill_slots));
    }
    if (!queued_here) {
      if (dated && slotted &&
          !may_take_slot_locked(deadline, request.wait_queue, options_.prefill_slots - slots_in_use_, now)) {
        ++priority_refusals_total_;
        sync_transfer_metrics();
        return resource_exhausted(
            "a request nearer its time-to-first-token deadline waits for this prefill's free slot; "
            "try another prefill or later");
      }
      if (!slotted && static_cast<int64_t>(incoming_.size()) + metrics_.waiting >= options_.max_waiting) {
        return resource_exhausted(
            fmt::format("{} requests are already waiting; retry later", options_.max_waiting));
      }
      if (options_.role == EngineRole::kPrefill) ++slots_in_use_;
      sync_transfer_metrics();
    }
  }
  if (queued_here) {
    for (Pending& p : dropped) end_unstarted(p, "cancelled", ok_status());
    if (!queue_status.ok()) return queue_status;
    return handle;
  }
  std::optional<KvSendBuffer> send;
  if (options_.role == EngineRole::kPrefill) {
    // The buffer is taken now, so that a prompt the pool has no room for is refused here (the
    // router tries another prefill) rather than failing after its first token went out.
    StatusOr<KvSendBuffer> b = acquire_send_buffer(static_cast<int32_t>(request.prompt.size()));
    if (!b.ok()) {
      // The slot goes back without waking a router (nothing was freed that it could use), and
      // is not noted for deadline priority (a prompt the pool has no room for may find none for
      // long, and other requests should not wait for it meanwhile).
      unreserve_slot();
      admit_slot_queue();  // the slot may have been taken ahead of a queued request
      return b.status();
    }
    send = std::move(*b);
  }
  const std::optional<KvBufferRef> send_ref = send ? std::optional<KvBufferRef>(send->ref) : std::nullopt;
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      incoming_.push_back(
          Pending{std::move(request), std::move(sink), handle, std::nullopt, nullptr, std::move(send)});
      queued = true;
    }
  }
  if (!queued) {  // the engine stopped meanwhile: nothing would hand the buffer off
    if (send_ref) (void)options_.kv_send->release(*send_ref);
    if (options_.role == EngineRole::kPrefill) unreserve_slot();  // stopped: nothing to admit
    return unavailable("the engine is shutting down");
  }
  cv_.notify_one();
  return handle;
}

StatusOr<std::shared_ptr<RequestHandle>> Engine::submit_handoff(EngineRequest request,
                                                                const EngineHandoff& handoff, OutputSink sink,
                                                                PulledCallback on_pulled,
                                                                std::shared_ptr<RequestHandle> handle) {
  if (options_.role != EngineRole::kDecode) {
    return failed_precondition(fmt::format("this is a {} instance: only a decode instance takes handoffs",
                                           engine_role_name(options_.role)));
  }
  PD_RETURN_IF_ERROR(validate(request));
  if (handoff.num_prompt_tokens != static_cast<int32_t>(request.prompt.size())) {
    return invalid_argument(fmt::format("the handoff has {} prompt tokens but the request has {}",
                                        handoff.num_prompt_tokens, request.prompt.size()));
  }
  if (handoff.first_token < -1 || handoff.first_token >= config_.vocab_size) {
    return invalid_argument(fmt::format(
        "the handoff's first token {} is outside the vocabulary (0..{}, or -1 when it comes with the KV)",
        handoff.first_token, config_.vocab_size - 1));
  }
  if (JsonPrefix json; request.response_format == ResponseFormat::kJsonObject && handoff.first_token >= 0 &&
                       !json_vocab().advance(json, handoff.first_token)) {
    return invalid_argument(
        fmt::format("the handoff's first token {} cannot begin a JSON object (the request is in JSON mode)",
                    handoff.first_token));
  }
  if (handoff.kv.kind != options_.kv_puller->kind()) {
    return invalid_argument(
        fmt::format("the handoff's KV is on transport '{}' but this decode pulls over '{}'",
                    transport_kind_name(handoff.kv.kind), transport_kind_name(options_.kv_puller->kind())));
  }
  if (!handle) handle = std::make_shared<RequestHandle>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the engine is shutting down");
    if (num_pending_ >= options_.decode_pending) {
      return resource_exhausted(
          fmt::format("{} handed-off requests already wait for this decode; try another decode or later",
                      options_.decode_pending));
    }
    ++num_pending_;
    sync_transfer_metrics();
    incoming_.push_back(Pending{std::move(request), std::move(sink), handle, handoff, std::move(on_pulled)});
  }
  cv_.notify_one();
  return handle;
}

Status Engine::release_handoff(const KvBufferRef& kv) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(held_.begin(), held_.end(), [&](const HeldHandoff& h) { return h.kv == kv; });
    if (it == held_.end() || it->release_asked) {
      return not_found(
          fmt::format("no handoff holds KV buffer {} (generation {}): released before, or its "
                      "lease ran out",
                      kv.buffer_id, kv.generation));
    }
    if (it->writing) {  // layer-wise, still being written: the engine frees it when it is done
      it->release_asked = true;
      return ok_status();
    }
    held_.erase(it);
    --slots_in_use_;
    sync_transfer_metrics();
  }
  Status st = options_.kv_send->release(kv);
  if (!st.ok()) PD_LOG_WARN("engine: releasing KV buffer {}: {}", kv.buffer_id, st.message());
  admit_slot_queue();
  if (options_.on_capacity) options_.on_capacity();
  return ok_status();
}

void Engine::note_refused_locked(std::chrono::steady_clock::time_point deadline, uint64_t queue,
                                 std::chrono::steady_clock::time_point now) {
  const auto window = std::chrono::milliseconds(options_.deadline_priority_ms);
  const auto tie = std::chrono::milliseconds(kDeadlineTieMs);
  if (!urgent_ || now - urgent_seen_ > window || deadline < urgent_deadline_ - tie) {
    urgent_ = true;
    urgent_deadline_ = deadline;
    urgent_queue_ = queue;
    urgent_seen_ = now;
  } else if (deadline <= urgent_deadline_ + tie) {
    urgent_seen_ = now;  // the most urgent one again: it still waits
  }
}

bool Engine::may_take_slot_locked(std::chrono::steady_clock::time_point deadline, uint64_t queue,
                                  int32_t free_slots, std::chrono::steady_clock::time_point now) {
  const auto tie = std::chrono::milliseconds(kDeadlineTieMs);
  if (!urgent_ || now - urgent_seen_ > std::chrono::milliseconds(options_.deadline_priority_ms)) {
    urgent_ = false;  // it was placed elsewhere or gave up
    return true;
  }
  // Its own queue offers its most urgent request first: anything it offers now is at least as
  // urgent as what is left of it.
  const bool same_queue = queue != 0 && queue == urgent_queue_;
  // One free slot is kept for it; any other may go to anyone.
  if (!same_queue && deadline > urgent_deadline_ + tie) return free_slots > 1;
  // That request, or its queue, takes a slot (one due sooner does, and leaves it waiting).
  if (same_queue || deadline >= urgent_deadline_ - tie) urgent_ = false;
  return true;
}

const JsonVocabulary& Engine::json_vocab() const {
  std::call_once(json_vocab_once_,
                 [this] { json_vocab_ = std::make_unique<const JsonVocabulary>(tokenizer_); });
  return *json_vocab_;
}

void Engine::sync_transfer_metrics() {
  metrics_.waiting = sched_waiting_ + static_cast<int32_t>(slot_queue_.size());
  metrics_.prefill_slots_in_use = slots_in_use_;
  metrics_.handoffs_outstanding = static_cast<int32_t>(held_.size());
  metrics_.handoff_leases_expired_total = leases_expired_total_;
  metrics_.priority_refusals_total = priority_refusals_total_;
  metrics_.decode_pending = num_pending_;
}

void Engine::release_slot() {
  unreserve_slot();
  admit_slot_queue();
  if (options_.on_capacity) options_.on_capacity();
}

void Engine::unreserve_slot() {
  std::lock_guard<std::mutex> lock(mu_);
  --slots_in_use_;
  sync_transfer_metrics();
}

StatusOr<KvSendBuffer> Engine::acquire_send_buffer(int32_t num_prompt) {
  StatusOr<KvSendBuffer> b = options_.kv_send->acquire(kv_message_bytes(kv_view_.layout, num_prompt));
  if (b.ok() || b.status().code() != StatusCode::kResourceExhausted) return b;
  return resource_exhausted(
             fmt::format("no room for this prompt's KV ({} tokens) in the prefill's KV send buffers ({}); "
                         "try another prefill or later",
                         num_prompt, b.status().message()))
      .with_reason(b.status().reason());
}

void Engine::end_unstarted(Pending& p, std::string finish_reason, Status error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_by_reason_[finish_reason];
    metrics_.finished_by_reason = finished_by_reason_;
  }
  EngineOutput out;
  out.finished = true;
  out.finish_reason = std::move(finish_reason);
  out.error = std::move(error);
  p.sink(std::move(out));
}

void Engine::admit_slot_queue() {
  for (bool first = true;; first = false) {
    std::optional<Pending> p;
    uint64_t epoch = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (first) ++admit_epoch_;  // a call that found the queue empty meanwhile shows here (below)
      if (stop_ || slot_queue_.empty() || slots_in_use_ >= options_.prefill_slots) return;
      epoch = admit_epoch_;
      p.emplace(std::move(slot_queue_.front()));
      slot_queue_.pop_front();
      ++slots_in_use_;
      sync_transfer_metrics();
    }
    if (p->handle->cancelled()) {
      unreserve_slot();
      end_unstarted(*p, "cancelled", ok_status());
      continue;
    }
    StatusOr<KvSendBuffer> b = acquire_send_buffer(static_cast<int32_t>(p->request.prompt.size()));
    if (!b.ok()) {
      // Every release of a buffer calls this again, which tries again; with none in use the
      // prompt can never fit. A release that came after the head was taken out found the
      // queue without it: the epoch says so, and the head is tried again now.
      const bool buffers_held = options_.kv_send->stats().buffers_in_use > 0;
      bool wait = false, again = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        --slots_in_use_;
        sync_transfer_metrics();
        if (b.status().code() == StatusCode::kResourceExhausted && !stop_ &&
            (buffers_held || admit_epoch_ != epoch)) {
          again = admit_epoch_ != epoch;
          wait = !again;
          slot_queue_.push_front(std::move(*p));
        }
      }
      if (again) continue;
      if (wait) return;
      end_unstarted(*p, "error", b.status());
      continue;
    }
    p->send = std::move(*b);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stop_) {
        incoming_.push_back(std::move(*p));
        p.reset();
      }
    }
    if (p) {  // the engine stopped meanwhile
      (void)options_.kv_send->release(p->send->ref);
      unreserve_slot();
      end_unstarted(*p, "error", unavailable("the prefill instance is shutting down"));
      return;
    }
    cv_.notify_one();
  }
}

void Engine::expire_handoffs() {
  std::vector<KvBufferRef> expired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = held_.begin(); it != held_.end();) {
      if (it->deadline <= now && !it->writing) {
        expired.push_back(it->kv);
        it = held_.erase(it);
        --slots_in_use_;
        ++leases_expired_total_;
        sync_transfer_metrics();
      } else {
        ++it;
      }
    }
  }
  for (const KvBufferRef& kv : expired) {
    PD_LOG_WARN("engine: the handoff of KV buffer {} was not released within {} ms; freeing its slot",
                kv.buffer_id, options_.handoff_lease_ms);
    (void)options_.kv_send->release(kv);
  }
  if (!expired.empty()) {
    admit_slot_queue();
    if (options_.on_capacity) options_.on_capacity();
  }
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
      // NOTE: handoffs waiting for a seat wake the loop only when a seat may have freed up.
      auto ready = [&] {
        return stop_ || !incoming_.empty() || !scheduler_.idle() || (!to_pull_.empty() && !pull_blocked_) ||
               pull_ended_;
      };
      if (!pulling_.empty()) {
        // Pulls end on the transport's threads, which wake this loop (pull_ended_); the timeout
        // bounds how late a cancelled request's pull is given up.
        cv_.wait_for(lock, std::chrono::milliseconds(20), ready);
      } else if (!held_.empty()) {
        auto first = std::min_element(
            held_.begin(), held_.end(),
            [](const HeldHandoff& a, const HeldHandoff& b) { return a.deadline < b.deadline; });
        cv_.wait_until(lock, first->deadline, ready);
      } else {
        cv_.wait(lock, ready);
      }
      pull_ended_ = false;
      incoming.swap(incoming_);
      stopping = stop_;
      sched_waiting_ = scheduler_.num_waiting();
      sync_transfer_metrics();
    }
    admit_incoming(incoming);
    if (stopping) {
      std::deque<Pending> queued;
      {
        std::lock_guard<std::mutex> lock(mu_);
        queued.swap(slot_queue_);
      }
      // Not started: a router may still place them on another prefill.
      for (Pending& p : queued)
        end_unstarted(p, "error", unavailable("the prefill instance is shutting down"));
      // A layer-wise pull may wait long on its prefill: give them up rather than wait.
      for (SequenceId id : pulling_) options_.kv_puller->cancel(active_.at(id)->transfer);
      land_pulls(/*wait=*/true);
      std::vector<SequenceId> ids;
      for (auto& [id, a] : active_) ids.push_back(id);
      for (SequenceId id : ids) {
        Active& a = *active_.at(id);
        if (a.on_pulled) a.on_pulled(unavailable("the decode instance is shutting down"));
        EngineOutput out;
        out.finish_reason = "cancelled";
        finish(id, std::move(out));
      }
      to_pull_.clear();
      publish_metrics(0);
      return;
    }
    if (options_.role == EngineRole::kPrefill) expire_handoffs();
    if (options_.role == EngineRole::kDecode) {
      land_pulls(/*wait=*/false);
      start_pulls();
    }
    step();
  }
}

void Engine::admit_incoming(std::deque<Pending>& incoming) {
  for (Pending& p : incoming) {
    SequenceId id = next_id_++;
    auto a =
        std::make_unique<Active>(std::move(p.request), std::move(p.sink), std::move(p.handle), tokenizer_);
    if (p.handoff) {
      // The prefill sampled and streamed the first token: replay it into the text stream (its
      // text is already out) and the sampler's random state, then wait for the KV. A layer-wise
      // handoff's first token comes with the KV (land_pulls).
      if (p.handoff->first_token >= 0) {
        (void)a->stream.feed(p.handoff->first_token);
        a->sampler.skip(1);
        // (submit_handoff() checked that it may begin the object.)
        if (a->json) PD_CHECK(json_vocab().advance(*a->json, p.handoff->first_token));
      }
      a->handoff = std::move(p.handoff);
      a->on_pulled = std::move(p.on_pulled);
      to_pull_.push_back(id);
    } else {
      a->send = std::move(p.send);
      scheduler_.add(id, a->request.prompt);
    }
    active_.emplace(id, std::move(a));
  }
}

void Engine::start_pulls() {
  bool freed = false;
  while (!to_pull_.empty()) {
    const SequenceId id = to_pull_.front();
    Active& a = *active_.at(id);
    const EngineHandoff& h = *a.handoff;
    Status st = ok_status();
    if (!a.handle->cancelled()) {
      std::vector<int32_t> tokens = a.request.prompt;
      tokens.push_back(std::max(h.first_token, 0));  // a placeholder until a layer-wise pull lands
      st = scheduler_.import(id, std::move(tokens), h.num_prompt_tokens);
      if (st.code() == StatusCode::kResourceExhausted) {  // one pull per freed seat
        pull_blocked_ = true;
        break;
      }
    }
    to_pull_.pop_front();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --num_pending_;
      sync_transfer_metrics();
    }
    freed = true;
    EngineOutput out;
    if (a.handle->cancelled()) {
      if (a.on_pulled) a.on_pulled(unavailable("the request was cancelled before its KV was fetched"));
      out.finish_reason = "cancelled";
      finish(id, std::move(out));
      continue;
    }
    if (st.ok()) {
      StatusOr<TransferId> t = options_.kv_puller->submit(
          h.kv, KvScatterTarget{kv_view_, scheduler_.block_table(id), h.num_prompt_tokens});
      if (t.ok()) {
        a.transfer = *t;
        a.pull_started = std::chrono::steady_clock::now();
        a.pulling = true;
        pulling_.push_back(id);
        continue;
      }
      st = t.status();
    }
    ++kv_pulls_failed_total_;
    if (a.on_pulled) a.on_pulled(st);
    out.finish_reason = "error";
    out.error = unavailable(
        fmt::format("the KV cache of this request could not be fetched from its prefill: {}", st.message()));
    finish(id, std::move(out));
  }
  if (freed && options_.on_capacity) options_.on_capacity();
}

void Engine::land_pulls(bool wait) {
  for (size_t i = 0; i < pulling_.size();) {
    const SequenceId id = pulling_[i];
    Active& a = *active_.at(id);
    TransferState ts = wait ? options_.kv_puller->wait(a.transfer) : options_.kv_puller->poll(a.transfer);
    if (ts.phase == TransferPhase::kPending) {
      ++i;
      continue;
    }
    pulling_.erase(pulling_.begin() + static_cast<std::ptrdiff_t>(i));
    a.pulling = false;
    if (ts.phase == TransferPhase::kDone) {
      ++kv_pulls_total_;
      kv_pulled_bytes_total_ += static_cast<int64_t>(ts.bytes);
      kv_pull_microseconds_total_ += std::chrono::duration_cast<std::chrono::microseconds>(
                                         std::chrono::steady_clock::now() - a.pull_started)
                                         .count();
    }
    pull_blocked_ = false;
    if (ts.phase == TransferPhase::kDone && a.handoff->first_token < 0) {
      // Layer-wise: the first token came with the KV.
      if (ts.first_token < 0 || ts.first_token >= config_.vocab_size) {
        ts.phase = TransferPhase::kFailed;
        ts.error = data_loss(fmt::format("the layer-wise KV came with first token {}, outside the vocabulary",
                                         ts.first_token));
      } else if (a.json && !json_vocab().advance(*a.json, ts.first_token)) {
        ts.phase = TransferPhase::kFailed;
        ts.error = data_loss(fmt::format(
            "the layer-wise KV came with first token {}, which cannot begin a JSON object (the request is in "
            "JSON mode)",
            ts.first_token));
      } else {
        a.handoff->first_token = ts.first_token;
        (void)a.stream.feed(ts.first_token);
        a.sampler.skip(1);
      }
    }
    PulledCallback on_pulled = std::move(a.on_pulled);
    a.on_pulled = nullptr;
    if (on_pulled) on_pulled(ts.phase == TransferPhase::kDone ? ok_status() : ts.error);
    EngineOutput out;
    if (a.handle->cancelled()) {  // whatever became of its pull (a waiting one was given up)
      out.finish_reason = "cancelled";
      finish(id, std::move(out));
    } else if (ts.phase != TransferPhase::kDone) {
      ++kv_pulls_failed_total_;
      out.finish_reason = "error";
      out.error = unavailable(fmt::format(
          "the KV cache of this request could not be fetched from its prefill: {}", ts.error.message()));
      finish(id, std::move(out));
    } else {
      scheduler_.activate(id, a.handoff->first_token);
    }
  }
}

void Engine::begin_early_handoff(SequenceId id) {
  Active& a = *active_.at(id);
  const int32_t num_prompt = static_cast<int32_t>(a.request.prompt.size());
  PD_CHECK(a.send.has_value());
  StatusOr<LayerWiseSend> send = begin_layer_wise_kv(*options_.kv_send, *a.send, kv_view_.layout, num_prompt);
  if (!send.ok()) return;  // the KV leaves whole after sampling (or fails then)
  a.send.reset();          // the layer-wise send holds it now
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_.push_back({send->handle.ref(),
                     std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handoff_lease_ms),
                     /*writing=*/true, /*release_asked=*/false});
    sync_transfer_metrics();
  }
  EngineOutput out;
  out.handoff = EngineHandoff{send->handle, -1, num_prompt};
  out.cached_prompt_tokens = scheduler_.num_cached_prompt_tokens(id);
  a.early = std::move(*send);
  a.early_error = ok_status();
  early_.push_back(id);
  a.sink(std::move(out));
}

void Engine::send_layer(int32_t layer) {
  for (SequenceId id : early_) {
    Active& a = *active_.at(id);
    if (!a.early || !a.early_error.ok()) continue;
    a.early_error = send_kv_layer(*options_.kv_send, *a.early, kv_view_, scheduler_.block_table(id), layer);
  }
}

KvBufferRef Engine::drop_early(Active& a) {
  const KvBufferRef ref = a.early->handle.ref();
  a.early.reset();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find_if(held_.begin(), held_.end(), [&](const HeldHandoff& h) { return h.kv == ref; });
  PD_CHECK(it != held_.end());
  held_.erase(it);  // the slot goes with the request, which finishes otherwise than "handoff"
  sync_transfer_metrics();
  return ref;
}

void Engine::hand_off(SequenceId id, EngineOutput& out) {
  Active& a = *active_.at(id);
  const int32_t num_prompt = static_cast<int32_t>(a.request.prompt.size());
  const int32_t first_token = out.tokens.back().id;
  // The first token goes out before the KV is gathered: the client sees it at once. (Layer-wise:
  // before the first token is published, so no decode streams past it.)
  a.sink(std::move(out));
  EngineOutput last;
  if (a.handle->cancelled()) {  // nobody would take or release the staged KV
    last.finish_reason = "cancelled";
    finish(id, std::move(last));
    return;
  }
  if (a.early) {
    Status st = a.early_error;
    // A GPU pool's layer copies may still be landing: waited for here, not under mu_ below
    // (which submissions and stats take).
    if (st.ok()) st = options_.kv_send->wait_layers_landed(a.early->handle.ref());
    bool given_up = false;
    {
      // Under mu_, so that a release either came before (the decode gave up without the KV) or
      // comes after the buffer is complete and an ordinary one (release_handoff checks `writing`).
      std::lock_guard<std::mutex> lock(mu_);
      auto it = std::find_if(held_.begin(), held_.end(),
                             [&](const HeldHandoff& h) { return h.kv == a.early->handle.ref(); });
      PD_CHECK(it != held_.end());
      given_up = it->release_asked;
      if (!given_up && st.ok()) {
        st = options_.kv_send->publish_progress(it->kv, config_.num_layers, first_token);
        if (st.ok()) {
          it->writing = false;
          // The lease counts from the first token, as for a whole-KV handoff.
          it->deadline =
              std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handoff_lease_ms);
        }
      }
    }
    if (given_up) {  // the decode that took the early handoff gave it up (its error ends the request)
      last.finish_reason = "cancelled";
      finish(id, std::move(last));
      return;
    }
    if (!st.ok()) {
      last.finish_reason = "error";
      last.error = unavailable(
          fmt::format("the prefill could not send this request's KV layer-wise: {}", st.message()));
      finish(id, std::move(last));
      return;
    }
    KvHandle kv = std::move(a.early->handle);
    a.early.reset();
    ++handoffs_total_;
    ++layer_wise_handoffs_total_;
    last.handoff = EngineHandoff{std::move(kv), first_token, num_prompt};
    last.finish_reason = "handoff";
    finish(id, std::move(last));
    return;
  }
  PD_CHECK(a.send.has_value());
  Status st = options_.kv_send->fill(*a.send, kv_view_, scheduler_.block_table(id), num_prompt, 0);
  if (!st.ok()) {
    last.finish_reason = "error";
    last.error = unavailable(
        fmt::format("the prefill could not stage this request's KV for a decode instance: {}", st.message()));
    finish(id, std::move(last));  // releases the buffer
    return;
  }
  KvHandle kv = std::move(a.send->handle);
  a.send.reset();
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_.push_back(
        {kv.ref(), std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handoff_lease_ms)});
    sync_transfer_metrics();
  }
  ++handoffs_total_;
  last.handoff = EngineHandoff{std::move(kv), first_token, num_prompt};
  last.finish_reason = "handoff";
  finish(id, std::move(last));
}

void Engine::step() {
  auto t0 = std::chrono::steady_clock::now();
  // Cancellations free their blocks before anything is planned.
  std::vector<SequenceId> cancelled;
  for (auto& [id, a] : active_) {
    // NOTE: a sequence whose KV is still arriving keeps its blocks until the pull ends
    // (land_pulls() finishes it then; a pull waiting on a layer-wise prefill gives up at once);
    // one waiting for its pull ends here.
    if (!a->handle->cancelled()) continue;
    if (!a->pulling) {
      cancelled.push_back(id);
    } else if (!a->pull_cancelled) {
      options_.kv_puller->cancel(a->transfer);
      a->pull_cancelled = true;
    }
  }
  for (SequenceId id : cancelled) {
    if (auto w = std::find(to_pull_.begin(), to_pull_.end(), id); w != to_pull_.end()) {
      to_pull_.erase(w);
      {
        std::lock_guard<std::mutex> lock(mu_);
        --num_pending_;
        sync_transfer_metrics();
      }
      Active& a = *active_.at(id);
      if (a.on_pulled) a.on_pulled(unavailable("the request was cancelled before its KV was fetched"));
      a.on_pulled = nullptr;
    }
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
      if (!pulling_.empty()) {
        // Decode role: the blocks the waiting (preempted) sequences need are held by KV pulls in
        // flight, which the loop lands (and runs) when they end; not an error. A bounded wait, so
        // cancellations keep being served meanwhile.
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(20),
                     [&] { return pull_ended_ || stop_ || !incoming_.empty(); });
      } else {
        // Nothing can run although requests wait: validate() makes this impossible; do not spin.
        PD_LOG_ERROR("engine: {} requests wait but none can be admitted", scheduler_.num_waiting());
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    return;
  }

  ForwardBatch batch;
  batch_tokens_.clear();
  int32_t num_logits = 0;
  // Where a row's draw needs only the logits (greedy or plain tempered, no biases or penalties, no
  // log-probabilities, not in JSON mode), a GPU draws the token itself and only its id crosses to the host
  // (not vocab_size floats); the other rows' logits come to the host sampler. The host sampler makes the same
  // draws, so a request's tokens do not depend on which path a step took.
  const bool on_device = executor_->draws_on_device();
  host_rows_.clear();
  draws_.clear();
  for (const ScheduledChunk& c : plan.chunks) {
    auto toks = scheduler_.tokens(c.seq).subspan(static_cast<size_t>(c.first_position),
                                                 static_cast<size_t>(c.num_tokens));
    batch_tokens_.insert(batch_tokens_.end(), toks.begin(), toks.end());
    batch.chunks.push_back({c.first_position, c.num_tokens, scheduler_.block_table(c.seq), c.want_logits});
    num_logits += c.want_logits ? 1 : 0;
    if (c.want_logits) {
      const Active& a = *active_.at(c.seq);
      if (on_device && (!a.sampler.device_drawable() || a.request.logprobs || a.json))
        host_rows_.push_back(num_logits - 1);
      const SamplingParams& sp = a.sampler.params();
      draws_.push_back({sp.temperature, sp.seed, a.sampler.draws(), sp.top_k, sp.top_p, sp.min_p});
    }
  }
  batch.tokens = batch_tokens_;
  early_.clear();
  if (layer_wise_) {
    for (const ScheduledChunk& c : plan.chunks) {
      if (!c.want_logits) continue;
      const Active& a = *active_.at(c.seq);
      // A request that may end at its first token (max_tokens 1) would send its KV for nothing.
      if (a.stream.num_tokens() == 0 && a.request.max_tokens > 1 && !a.handle->cancelled())
        begin_early_handoff(c.seq);
    }
    if (!early_.empty()) batch.after_layer = [this](int32_t layer) { send_layer(layer); };
  }
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  // Every row on the host: the plain forward pass (no draws to make).
  const bool draw_on_device = on_device && host_rows_.size() < static_cast<size_t>(num_logits);
  Status st;
  if (draw_on_device) {
    next_tokens_.resize(static_cast<size_t>(num_logits));
    if (logits_.size() < host_rows_.size() * vocab) logits_.resize(host_rows_.size() * vocab);
    st = executor_->forward_draw(batch, draws_, next_tokens_.data(),
                                 HostLogitRows{host_rows_, logits_.data()});
  } else {
    if (logits_.size() < static_cast<size_t>(num_logits) * vocab)
      logits_.resize(static_cast<size_t>(num_logits) * vocab);
    st = executor_->forward(batch, logits_.data());
  }
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

  size_t row = 0, host_row = 0;  // host_row: the next of host_rows_ (their logits, in order)
  for (const ScheduledChunk& c : plan.chunks) {
    if (!c.want_logits) continue;
    Active& a = *active_.at(c.seq);
    if (a.stream.num_tokens() == 0) a.cached_prompt_tokens = scheduler_.num_cached_prompt_tokens(c.seq);
    SampleResult r;
    const bool on_host = !draw_on_device ||
                         (host_row < host_rows_.size() && host_rows_[host_row] == static_cast<int32_t>(row));
    // No token with a usable logit (all NaN or -inf): the forward pass overflowed, or the weights
    // hold NaN. The backend says so with -1; on the host, the drawn token's logit shows it.
    bool unusable = false;
    if (!on_host) {
      r.token = next_tokens_[row];
      unusable = r.token < 0;
      a.sampler.skip(1);
    } else {
      const size_t at = draw_on_device ? host_row++ : row;
      const std::span<float> logits(logits_.data() + at * vocab, vocab);
      // JSON mode: the tokens that would leave the text no prefix of an object go first. Some
      // token always remains: validate() refused vocabularies where one might not
      // (kJsonCompletionBytes).
      if (a.json) PD_CHECK(json_vocab().mask(*a.json, logits) > 0);
      r = a.sampler.sample(logits, scheduler_.tokens(c.seq), a.request.logprobs);
      unusable = !usable_logit(logits[static_cast<size_t>(r.token)]);
    }
    ++row;
    if (unusable) {
      ++nonfinite_logits_total_;
      PD_LOG_ERROR("engine: the logits of a request at position {} hold no usable value (NaN or -inf) on {}",
                   c.first_position + c.num_tokens - 1, executor_->device());
      EngineOutput out;
      out.finish_reason = "error";
      out.error = no_usable_logits(a.stream.num_tokens(), executor_->device(), executor_->number_format());
      a.suspect_kv = true;  // the overflow may have reached its KV: no later request reuses it
      finish(c.seq, std::move(out));
      continue;
    }
    if (a.json) PD_CHECK(json_vocab().advance(*a.json, r.token));  // the mask allowed it
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
    } else if (options_.role == EngineRole::kPrefill) {
      hand_off(c.seq, out);
    } else {
      a.sink(std::move(out));
    }
  }
  early_.clear();
  ++steps_total_;
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  step_seconds_total_ += secs;
  publish_metrics(secs);
  if (options_.on_step) options_.on_step(secs, plan.num_tokens());
}

void Engine::finish(SequenceId id, EngineOutput&& last) {
  auto it = active_.find(id);
  PD_CHECK(it != active_.end());
  Active& a = *it->second;
  // A layer-wise buffer the request gives up is released after its last output has gone out:
  // pulls waiting on it then fail, and a router has voided that decode attempt by then.
  std::optional<KvBufferRef> give_up;
  if (a.early) give_up = drop_early(a);
  if (a.send) {  // taken at submit() and never handed off: no peer knows it, so it goes at once
    Status st = options_.kv_send->release(a.send->ref);
    if (!st.ok()) PD_LOG_WARN("engine: releasing KV buffer {}: {}", a.send->ref.buffer_id, st.message());
    a.send.reset();
  }
  if (last.finish_reason == "cancelled" || last.finish_reason == "error") {
    TextStream::Update u = a.stream.finish(last.finish_reason);
    last.text += u.text;
  }
  last.finished = true;
  if (options_.role == EngineRole::kPrefill && last.finish_reason != "handoff") release_slot();
  last.prompt_tokens = static_cast<int32_t>(a.request.prompt.size());
  last.completion_tokens = a.stream.num_tokens();
  last.cached_prompt_tokens = a.cached_prompt_tokens;
  // A handed-off prompt is counted once, by the decode that finishes it.
  if (last.finish_reason != "handoff") prompt_tokens_total_ += last.prompt_tokens;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_by_reason_[last.finish_reason];
  }
  scheduler_.remove(id, a.suspect_kv);
  pull_blocked_ = false;  // a seat or blocks may be free now
  OutputSink sink = std::move(a.sink);
  active_.erase(it);
  // Metrics first, so whoever sees the final output also sees the blocks freed.
  publish_metrics(0);
  sink(std::move(last));
  if (give_up) {
    Status st = options_.kv_send->release(*give_up);
    if (!st.ok()) PD_LOG_WARN("engine: releasing KV buffer {}: {}", give_up->buffer_id, st.message());
    admit_slot_queue();  // the head may have found no room while this buffer was held
  }
}

void Engine::publish_metrics(double step_seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  metrics_.running = scheduler_.num_running();
  sched_waiting_ = scheduler_.num_waiting();
  metrics_.kv = kv_.stats();
  metrics_.preemptions_total = scheduler_.num_preemptions();
  metrics_.prompt_tokens_total = prompt_tokens_total_;
  metrics_.generated_tokens_total = generated_tokens_total_;
  metrics_.computed_tokens_total = computed_tokens_total_;
  metrics_.nonfinite_logits_total = nonfinite_logits_total_;
  sync_transfer_metrics();
  metrics_.handoffs_total = handoffs_total_;
  metrics_.layer_wise_handoffs_total = layer_wise_handoffs_total_;
  metrics_.kv_pulls_in_flight = static_cast<int32_t>(pulling_.size());
  metrics_.kv_pulls_failed_total = kv_pulls_failed_total_;
  metrics_.kv_pulls_total = kv_pulls_total_;
  metrics_.kv_pulled_bytes_total = kv_pulled_bytes_total_;
  metrics_.kv_pull_microseconds_total = kv_pull_microseconds_total_;
  metrics_.steps_total = steps_total_;
  metrics_.step_seconds_total = step_seconds_total_;
  if (step_seconds > 0) metrics_.last_step_seconds = step_seconds;
  metrics_.finished_by_reason = finished_by_reason_;
}

}  // namespace pdserve
