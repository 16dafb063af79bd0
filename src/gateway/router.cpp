#include "gateway/router.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <iterator>
#include <limits>
#include <numeric>
#include <optional>

#include "common/check.h"
#include "common/log.h"

namespace pdserve {

namespace {

using Clock = std::chrono::steady_clock;

// Instance indices ordered by their open streams (fewest first; ties by index), without `skip`.
std::vector<size_t> ranked(const std::vector<int32_t>& open, const std::vector<bool>& skip) {
  std::vector<size_t> order;
  for (size_t i = 0; i < open.size(); ++i) {
    if (skip.empty() || !skip[i]) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return open[a] < open[b]; });
  return order;
}

}  // namespace

struct Router::Flight {
  EngineRequest request;
  OutputSink sink;
  std::shared_ptr<RequestHandle> handle;
  Clock::time_point arrived;
  Clock::time_point deadline;
  std::vector<bool> failed_on;  // prefills that failed this request before its first token
  // prefills that ended it unstarted or unreachable once (kUnavailable) before its first token: asked
  // again; a second such end counts as a failure (failed_on)
  std::vector<bool> unavailable_on;
  // prefills found away (kUnavailable: at submit, or such an end): offered it after the others
  std::vector<bool> away_on;
  int assigned = -1;  // baseline admission: the prefill whose queue the request joined
  // Its last offer (try_place) found no taker only because prefills' KV send buffers had no room
  // for its prompt now (Status::reason() kSendPoolNoRoom; no refusal for a slot or a full queue,
  // prefills found away aside): shorter prompts may still fit.
  bool refused_for_room = false;
  // Set on the prefill's thread before the handoff is passed on; read by whoever passes it.
  bool got_first_token = false;
  size_t prefill_idx = 0;
  std::optional<EngineHandoff> handoff;
  Clock::time_point decode_deadline;  // handed off: a decode must take it by then
  int32_t cached_prompt_tokens = 0;

  // What reaches the client, serialized: the prefill's first token before any decode output,
  // nothing after the end. Guards the fields below.
  std::mutex out_mu;
  bool ended = false;
  bool first_forwarded = false;
  std::vector<EngineOutput> held;  // decode outputs that came before the first token
  int attempt = 0;                 // the decode attempt whose outputs count
  bool early_decode = false;       // a decode took an early (layer-wise) handoff: attempt `attempt`
  std::shared_ptr<RequestHandle> early_handle;  // that attempt's
};

Router::Router(std::vector<Instance*> prefills, std::vector<Instance*> decodes, const RouterOptions& options)
    : prefills_(std::move(prefills)),
      decodes_(std::move(decodes)),
      options_(options),
      prefill_open_(prefills_.size(), 0),
      prefill_queues_(prefills_.size()),
      decode_open_(decodes_.size(), 0),
      queue_id_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32) | 1),
      away_since_(prefills_.size()),
      away_seen_(prefills_.size()) {
  PD_CHECK_MSG(!prefills_.empty() && !decodes_.empty(), "a router needs at least one prefill and one decode");
  for (Instance* e : prefills_) PD_CHECK(e->role() == EngineRole::kPrefill);
  for (Instance* e : decodes_) PD_CHECK(e->role() == EngineRole::kDecode);
  thread_ = std::thread([this] { loop(); });
}

Router::~Router() { stop(); }

void Router::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::deque<std::shared_ptr<Flight>> waiting, to_decode;
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiting.swap(waiting_);
    to_decode.swap(to_decode_);
    for (auto& q : prefill_queues_) {
      waiting.insert(waiting.end(), q.begin(), q.end());
      q.clear();
    }
  }
  for (auto& f : to_decode) (void)prefills_[f->prefill_idx]->release_handoff(f->handoff->kv.ref());
  for (auto* q : {&waiting, &to_decode}) {
    for (auto& f : *q) {
      end_cancelled(f);
    }
  }
}

int32_t Router::max_context() const {
  int32_t m = prefills_[0]->max_context();
  for (Instance* e : decodes_) m = std::min(m, e->max_context());
  return m;
}

int64_t Router::max_sequence_tokens() const {
  // The decode holds prompt and generated tokens; a prefill validates a request as if it held them
  // too (see validate()), so its KV bounds the sequence as well.
  int64_t m = max_context();
  for (Instance* e : decodes_) m = std::min(m, e->max_sequence_tokens());
  for (Instance* e : prefills_) m = std::min(m, e->max_sequence_tokens());
  return m;
}

Status Router::validate(const EngineRequest& request) const {
  // A decode must hold the whole sequence; any prefill must hold the prompt (checked by its
  // own validate() as if it generated too, which the prefill's context allows). Each is asked,
  // since any may get the request (and an older build would ignore newer fields).
  for (Instance* e : decodes_) PD_RETURN_IF_ERROR(e->validate(request));
  for (Instance* e : prefills_) PD_RETURN_IF_ERROR(e->validate(request));
  return ok_status();
}

StatusOr<std::shared_ptr<RequestHandle>> Router::submit(EngineRequest request, OutputSink sink,
                                                        std::shared_ptr<RequestHandle> handle) {
  PD_RETURN_IF_ERROR(validate(request));
  auto f = std::make_shared<Flight>();
  f->handle = handle ? std::move(handle) : std::make_shared<RequestHandle>();
  f->arrived = Clock::now();
  const double budget_ms = static_cast<double>(options_.ttft_budget_ms) +
                           options_.ttft_budget_ms_per_token * static_cast<double>(request.prompt.size());
  f->deadline = f->arrived + std::chrono::microseconds(static_cast<int64_t>(budget_ms * 1000.0));
  f->request = std::move(request);
  f->sink = std::move(sink);
  f->failed_on.assign(prefills_.size(), false);
  f->unavailable_on.assign(prefills_.size(), false);
  f->away_on.assign(prefills_.size(), false);
  std::shared_ptr<RequestHandle> out = f->handle;
  bool queue_first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the gateway is shutting down");
    ++requests_total_;
    // Nobody overtakes requests already waiting that are due no later (baseline: first come,
    // first served in the prefill's own queue, checked in try_place()).
    queue_first = options_.admission == AdmissionPolicy::kOnDemand && (!waiting_.empty() || dispatching_);
    if (queue_first) insert_waiting_locked(f);
  }
  if (queue_first) {
    notify_capacity();
  } else if (!try_place(f)) {
    hold(f);
    // Baseline: held behind what the router thread has in hand (or refused even a place in the
    // prefill's queue); the next pass offers it again at once rather than on the tick.
    if (options_.admission == AdmissionPolicy::kBaseline) notify_capacity();
  }
  return out;
}

void Router::insert_waiting_locked(const std::shared_ptr<Flight>& f) {
  // Behind every request due no later (first come, first served among equal budgets).
  auto at =
      std::upper_bound(waiting_.begin(), waiting_.end(), f->deadline,
                       [](Clock::time_point d, const std::shared_ptr<Flight>& w) { return d < w->deadline; });
  waiting_.insert(at, f);
}

void Router::park(std::deque<std::shared_ptr<Flight>>& queue, const std::shared_ptr<Flight>& f, bool front) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      if (&queue == &waiting_) {
        insert_waiting_locked(f);
      } else if (front) {
        queue.push_front(f);
      } else {
        queue.push_back(f);
      }
      return;
    }
  }
  // Stopped meanwhile: nobody would retry it.
  if (f->handoff) (void)prefills_[f->prefill_idx]->release_handoff(f->handoff->kv.ref());
  end_cancelled(f);
}

void Router::hold(const std::shared_ptr<Flight>& f, bool front) {
  if (options_.admission == AdmissionPolicy::kBaseline) {
    park(prefill_queues_[static_cast<size_t>(f->assigned)], f, front);
  } else {
    park(waiting_, f, front);
  }
}

void Router::notify_capacity() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    retry_ = true;
  }
  cv_.notify_one();
}

// A prefill found away that was last found so longer ago than this may have been back meanwhile:
// a new sighting starts a new absence.
constexpr std::chrono::seconds kAwayLately{1};

void Router::note_prefill_away_locked(size_t idx, bool away) {
  if (!away) {
    away_since_[idx] = {};
    return;
  }
  const Clock::time_point now = Clock::now();
  if (away_since_[idx] == Clock::time_point{} || now - away_seen_[idx] > kAwayLately) away_since_[idx] = now;
  away_seen_[idx] = now;
}

bool Router::prefill_away_since_locked(size_t idx, Clock::time_point since) const {
  return away_since_[idx] != Clock::time_point{} && away_since_[idx] <= since &&
         away_seen_[idx] >= Clock::now() - kAwayLately;
}

bool Router::prefills_away_since_locked(const Flight& f, Clock::time_point since) const {
  bool any = false;
  for (size_t i = 0; i < prefills_.size(); ++i) {
    if (f.failed_on[i]) continue;
    if (!prefill_away_since_locked(i, since)) return false;
    any = true;
  }
  return any;
}

size_t Router::least_loaded_locked(const Flight& f) {
  // A prefill found away only when no other is left (its count fell with its streams).
  for (bool away : {false, true}) {
    size_t best = prefills_.size();
    int32_t best_load = 0, equals = 0;
    for (size_t i = 0; i < prefills_.size(); ++i) {
      if (f.failed_on[i] || f.away_on[i] != away) continue;
      const int32_t load = prefill_open_[i] + static_cast<int32_t>(prefill_queues_[i].size());
      if (best == prefills_.size() || load < best_load) {
        best = i;
        best_load = load;
        equals = 1;
      } else if (load == best_load && std::uniform_int_distribution<int32_t>(0, equals++)(tie_rng_) == 0) {
        best = i;  // each of the equals is kept with the same chance
      }
    }
    if (best != prefills_.size()) return best;
  }
  return prefills_.size();
}

bool Router::try_place(const std::shared_ptr<Flight>& f, bool queued) {
  f->refused_for_room = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;  // park() ends it
  }
  if (f->handle->cancelled()) {
    end_cancelled(f);
    return true;
  }
  std::vector<size_t> order;
  {
    std::lock_guard<std::mutex> lock(mu_);
    order = ranked(prefill_open_, f->failed_on);
  }
  // A prefill found away is asked after the others.
  std::stable_partition(order.begin(), order.end(), [&](size_t i) { return !f->away_on[i]; });
  if (order.empty()) {
    EngineOutput out;
    out.finish_reason = "error";
    out.error = unavailable(
        fmt::format("every prefill instance of scenario '{}' failed this request", options_.scenario));
    end(f, std::move(out));
    return true;
  }
  if (options_.admission == AdmissionPolicy::kBaseline) {
    // The paper's baseline: each request joins the queue of the prefill with the fewest open
    // streams (queued ones included, as this gateway counts them) and waits there, whatever the
    // other prefills do.
    // A prefill it failed on or found away is left for another queue, if there is one (order is
    // not empty: there is a prefill to choose).
    if (f->assigned < 0 || f->failed_on[static_cast<size_t>(f->assigned)] ||
        f->away_on[static_cast<size_t>(f->assigned)]) {
      std::lock_guard<std::mutex> lock(mu_);
      f->assigned = static_cast<int>(least_loaded_locked(*f));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Behind the others (also while the router thread has them in hand).
      if (!queued && (dispatching_ || !prefill_queues_[static_cast<size_t>(f->assigned)].empty()))
        return false;
    }
    order.assign(1, static_cast<size_t>(f->assigned));
  }
  EngineRequest request = f->request;
  if (options_.admission == AdmissionPolicy::kOnDemand) request.wait_queue = queue_id_;
  // Refusals for room, and for anything else (a prefill found away counts as neither).
  bool refused_for_room = false, refused_otherwise = false;
  // The baseline's queue is the prefill's own FIFO, shared by every gateway; the gateway holds a
  // request in its own queue for that prefill only while the prefill refuses even that (its
  // queue full, no room for the KV, or an instance that does not queue).
  if (options_.admission == AdmissionPolicy::kBaseline) request.queue_if_full = true;
  for (size_t idx : order) {
    if (options_.admission == AdmissionPolicy::kOnDemand) {
      // What is left of its budget, as of this offer: a prefill favours the most urgent of the
      // requests it refused.
      request.wait_budget_us = std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::microseconds>(f->deadline - Clock::now()).count());
    }
    {
      // NOTE: counted before submit(): the engine may call the sink before submit() returns.
      std::lock_guard<std::mutex> lock(mu_);
      ++prefill_open_[idx];
    }
    auto sink = [this, f, idx](EngineOutput&& o) { on_prefill_output(f, idx, std::move(o)); };
    auto accepted = prefills_[idx]->submit(request, std::move(sink), f->handle);
    const StatusCode code = accepted.ok() ? StatusCode::kOk : accepted.status().code();
    {
      std::lock_guard<std::mutex> lock(mu_);
      note_prefill_away_locked(idx, code == StatusCode::kUnavailable);
      if (!accepted.ok()) --prefill_open_[idx];
      if (code == StatusCode::kResourceExhausted) ++rejections_total_;
      if (code == StatusCode::kResourceExhausted && accepted.status().reason() == kSendPoolNoRoom)
        ++room_rejections_total_;
    }
    if (accepted.ok()) return true;
    if (code == StatusCode::kResourceExhausted) {
      (accepted.status().reason() == kSendPoolNoRoom ? refused_for_room : refused_otherwise) = true;
      if (options_.admission == AdmissionPolicy::kBaseline) return false;  // wait in its queue
      continue;  // a full prefill refuses at once: inquire the next one
    }
    if (accepted.status().code() == StatusCode::kUnavailable) {
      // A prefill that is down or going away: ask the others now, and this one again later, after
      // them (it may come back: within the request's budget; the baseline, which has none, waits
      // for it while no other prefill is left). Only a prefill that accepted the request and then
      // failed it is never asked again (failed_on; a first kUnavailable end excepted).
      const bool seen = f->away_on[idx];
      f->away_on[idx] = true;
      if (!seen) {  // counted once per request and prefill, not at every re-offer
        std::lock_guard<std::mutex> lock(mu_);
        ++prefill_retries_total_;
      }
      if (options_.admission == AdmissionPolicy::kBaseline) {
        // Its queue would wait behind a prefill that is not there: join the shortest one of a
        // prefill not found away, if there is one (this one is a choice: never none).
        std::lock_guard<std::mutex> lock(mu_);
        f->assigned = static_cast<int>(least_loaded_locked(*f));
        return false;
      }
      continue;
    }
    EngineOutput out;
    out.finish_reason = "error";
    out.error = accepted.status();
    end(f, std::move(out));
    return true;
  }
  f->refused_for_room = refused_for_room && !refused_otherwise;
  return false;
}

Status Router::offer_to_decodes(const std::shared_ptr<Flight>& f, size_t prefill_idx,
                                const EngineHandoff& handoff, int attempt,
                                const std::shared_ptr<RequestHandle>& handle) {
  Instance* prefill = prefills_[prefill_idx];
  const KvBufferRef kv = handoff.kv.ref();
  std::vector<size_t> order;
  {
    std::lock_guard<std::mutex> lock(mu_);
    order = ranked(decode_open_, {});
  }
  for (size_t idx : order) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++decode_open_[idx];
    }
    auto sink = [this, f, idx, attempt](EngineOutput&& o) {
      on_decode_output(f, idx, attempt, std::move(o));
    };
    // The decode has the KV (or gave up on it): the prefill frees the slot and the buffer.
    auto on_pulled = [this, prefill, kv](const Status&) {
      (void)prefill->release_handoff(kv);
      notify_capacity();  // a prefill slot is free
    };
    auto accepted =
        decodes_[idx]->submit_handoff(f->request, handoff, std::move(sink), std::move(on_pulled), handle);
    if (accepted.ok()) return ok_status();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --decode_open_[idx];
    }
    // A full decode, or one that went away: ask the next.
    if (accepted.status().code() != StatusCode::kResourceExhausted &&
        accepted.status().code() != StatusCode::kUnavailable) {
      return accepted.status();
    }
  }
  return resource_exhausted("every decode instance is full or away");
}

bool Router::try_hand_to_decode(const std::shared_ptr<Flight>& f) {
  Instance* prefill = prefills_[f->prefill_idx];
  const KvBufferRef kv = f->handoff->kv.ref();
  if (f->handle->cancelled()) {
    (void)prefill->release_handoff(kv);
    end_cancelled(f);
    return true;
  }
  int attempt;
  {
    std::lock_guard<std::mutex> lock(f->out_mu);
    attempt = f->attempt;
  }
  Status st = offer_to_decodes(f, f->prefill_idx, *f->handoff, attempt, f->handle);
  if (st.ok()) return true;
  if (st.code() == StatusCode::kResourceExhausted) return false;  // waits here for a decode
  (void)prefill->release_handoff(kv);
  EngineOutput out;
  out.finish_reason = "error";
  out.error = st;
  end(f, std::move(out));
  return true;
}

void Router::hand_early(const std::shared_ptr<Flight>& f, size_t prefill_idx, const EngineHandoff& handoff) {
  if (f->handle->cancelled()) return;  // the prefill ends it
  auto child = std::make_shared<RequestHandle>(f->handle);
  int attempt;
  {
    std::lock_guard<std::mutex> lock(f->out_mu);
    attempt = ++f->attempt;
  }
  Status st = offer_to_decodes(f, prefill_idx, handoff, attempt, child);
  if (st.ok()) {
    std::lock_guard<std::mutex> lock(f->out_mu);
    f->early_decode = true;
    f->early_handle = child;
  } else if (st.code() != StatusCode::kResourceExhausted) {
    // The handoff after the first token tries again, and reports what fails then.
    PD_LOG_WARN("gateway: a decode refused an early handoff: {}", st.message());
  }
}

void Router::on_prefill_output(const std::shared_ptr<Flight>& f, size_t idx, EngineOutput&& out) {
  if (!out.finished) {
    if (out.handoff) {  // early (layer-wise): a decode may pull while the prefill still computes
      f->prefill_idx = idx;
      f->cached_prompt_tokens = out.cached_prompt_tokens;
      hand_early(f, idx, *out.handoff);
      return;
    }
    const bool token = !out.tokens.empty();
    if (token) f->got_first_token = true;
    std::lock_guard<std::mutex> lock(f->out_mu);
    if (f->ended) return;
    f->sink(std::move(out));
    if (token && !f->first_forwarded) {
      f->first_forwarded = true;
      std::vector<EngineOutput> held = std::move(f->held);
      f->held.clear();
      for (EngineOutput& h : held) deliver_decode_locked(*f, std::move(h));
    }
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    --prefill_open_[idx];
  }
  notify_capacity();
  {
    std::lock_guard<std::mutex> lock(f->out_mu);
    if (f->early_decode) {
      // The decode that took the early handoff has the request (and releases the prefill).
      if (out.handoff) return;
      // The prefill ended it otherwise: that attempt is void.
      f->early_decode = false;
      ++f->attempt;
      f->held.clear();
      f->early_handle->cancel();
    }
  }
  if (out.handoff) {
    f->prefill_idx = idx;
    f->handoff = std::move(out.handoff);
    f->decode_deadline = Clock::now() + std::chrono::milliseconds(options_.decode_wait_ms);
    f->cached_prompt_tokens = out.cached_prompt_tokens;
    bool queue_first, stopped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped = stop_;
      queue_first = !stopped && !to_decode_.empty();
      if (queue_first) to_decode_.push_back(f);
    }
    if (stopped) {
      (void)prefills_[idx]->release_handoff(f->handoff->kv.ref());
      end_cancelled(f);
    } else if (!queue_first && !try_hand_to_decode(f)) {
      park(to_decode_, f);
    }
    return;
  }
  if (out.finish_reason == "error" && !f->got_first_token && !f->handle->cancelled()) {
    // Failed before its first token: another prefill may succeed. A prefill that went away or
    // could not be reached (kUnavailable: it shut down with the request still in its queue, or
    // its stream broke) may come back within the request's budget, as one that refuses at
    // submit may: the others are asked first, and it again later; only a second such end, or
    // any other error, rules it out for this request.
    const bool away = out.error.code() == StatusCode::kUnavailable && !f->unavailable_on[idx];
    PD_LOG_WARN("gateway: prefill {} failed a request before its first token ({}); retrying {}", idx,
                out.error.message(), away ? "on the others first" : "elsewhere");
    if (away) {
      f->unavailable_on[idx] = true;
      f->away_on[idx] = true;
    } else {
      f->failed_on[idx] = true;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++prefill_retries_total_;
      if (out.error.code() == StatusCode::kUnavailable) note_prefill_away_locked(idx, true);
    }
    if (!try_place(f, /*queued=*/true)) hold(f, /*front=*/true);
    return;
  }
  end(f, std::move(out));
}

void Router::on_decode_output(const std::shared_ptr<Flight>& f, size_t idx, int attempt, EngineOutput&& out) {
  if (out.finished) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      --decode_open_[idx];
    }
    notify_capacity();
  }
  std::lock_guard<std::mutex> lock(f->out_mu);
  if (attempt != f->attempt || f->ended) return;  // an attempt given up
  if (!f->first_forwarded) {
    f->held.push_back(std::move(out));
    return;
  }
  deliver_decode_locked(*f, std::move(out));
}

void Router::deliver_decode_locked(Flight& f, EngineOutput&& out) {
  if (!out.finished) {
    if (!f.ended) f.sink(std::move(out));
    return;
  }
  out.cached_prompt_tokens = f.cached_prompt_tokens;
  end_locked(f, std::move(out));
}

void Router::end_cancelled(const std::shared_ptr<Flight>& f) {
  EngineOutput out;
  out.finish_reason = "cancelled";
  end(f, std::move(out));
}

void Router::end(const std::shared_ptr<Flight>& f, EngineOutput&& last) {
  std::lock_guard<std::mutex> lock(f->out_mu);
  end_locked(*f, std::move(last));
}

void Router::end_locked(Flight& f, EngineOutput&& last) {
  if (f.ended) return;
  f.ended = true;
  last.finished = true;
  if (last.prompt_tokens == 0) last.prompt_tokens = static_cast<int32_t>(f.request.prompt.size());
  f.sink(std::move(last));
}

void Router::loop() {
  for (;;) {
    std::deque<std::shared_ptr<Flight>> waiting, to_decode;
    std::vector<std::deque<std::shared_ptr<Flight>>> queues;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // NOTE: a timed wake-up also checks budgets and cancellations of waiting requests.
      cv_.wait_for(lock, std::chrono::milliseconds(10), [&] { return stop_ || retry_; });
      if (stop_) return;
      retry_ = false;
      waiting.swap(waiting_);
      to_decode.swap(to_decode_);
      dispatching_ = true;  // submit() queues behind what is in hand here
      // NOTE: swap the deques, not the vector: park() holds references to its elements.
      queues.resize(prefill_queues_.size());
      for (size_t i = 0; i < queues.size(); ++i) queues[i].swap(prefill_queues_[i]);
    }
    // Handed-off requests first: they hold prefill slots.
    std::deque<std::shared_ptr<Flight>> keep_decode;
    for (auto& f : to_decode) {
      if (Clock::now() >= f->decode_deadline) {
        (void)prefills_[f->prefill_idx]->release_handoff(f->handoff->kv.ref());
        EngineOutput out;
        out.finish_reason = "error";
        out.error = unavailable(fmt::format(
            "no decode instance of scenario '{}' could take this request within {} ms of its first token",
            options_.scenario, options_.decode_wait_ms));
        end(f, std::move(out));
        continue;
      }
      if (!keep_decode.empty() || !try_hand_to_decode(f)) keep_decode.push_back(f);
    }
    std::deque<std::shared_ptr<Flight>> keep_waiting;
    const Clock::time_point now = Clock::now();
    // A request no prefill took waits, and those due later wait behind it (the prefills would
    // refuse them for the same reason) — unless it was refused only for room in the prefills' KV
    // send buffers: then shorter prompts behind it may go ahead, while it has at least half its
    // budget left. After that, nothing behind it is offered, so that room frees for it.
    bool blocked = false;
    size_t room_refused_tokens = std::numeric_limits<size_t>::max();  // the shortest prompt refused for room
    for (auto& f : waiting) {
      if (f->handle->cancelled()) {
        end_cancelled(f);
        continue;
      }
      if (now >= f->deadline) {
        const double waited_s = std::chrono::duration<double>(now - f->arrived).count();
        const double budget_s = std::chrono::duration<double>(f->deadline - f->arrived).count();
        {
          std::lock_guard<std::mutex> lock(mu_);
          ++timeouts_total_;
        }
        EngineOutput out;
        out.finish_reason = "error";
        out.error = Status(StatusCode::kDeadlineExceeded,
                           fmt::format("no prefill instance of scenario '{}' took this request within its "
                                       "time-to-first-token budget: it waited {:.2f} s (budget {:.2f} s for "
                                       "a {}-token prompt); the service is overloaded, retry later",
                                       options_.scenario, waited_s, budget_s, f->request.prompt.size()));
        end(f, std::move(out));
        continue;
      }
      if (blocked || f->request.prompt.size() >= room_refused_tokens) {
        keep_waiting.push_back(f);  // due later than a request that waits: behind it
        continue;
      }
      if (try_place(f, /*queued=*/true)) continue;
      keep_waiting.push_back(f);
      if (f->refused_for_room && 2 * (f->deadline - now) >= f->deadline - f->arrived) {
        room_refused_tokens = f->request.prompt.size();  // shorter prompts may still fit
      } else {
        blocked = true;
      }
    }
    // Baseline admission: each prefill's queue, in order; no budget (requests wait however long),
    // but while every prefill a request could go to is away, only prefill_away_wait_ms.
    std::vector<std::deque<std::shared_ptr<Flight>>> keep_queues(queues.size());
    const Clock::time_point away_before = now - std::chrono::milliseconds(options_.prefill_away_wait_ms);
    for (size_t i = 0; i < queues.size(); ++i) {
      if (queues[i].empty()) continue;
      bool full = false;
      // Its requests can only have run out of prefills if this one has been away so long (one that
      // failed on it moves to another queue in try_place, and is checked there).
      bool away;
      {
        std::lock_guard<std::mutex> lock(mu_);
        away = prefill_away_since_locked(i, away_before);
      }
      for (auto& f : queues[i]) {
        bool gone = false;
        if (away) {
          std::lock_guard<std::mutex> lock(mu_);
          gone = prefills_away_since_locked(*f, away_before);
        }
        if (f->handle->cancelled()) {
          end_cancelled(f);
        } else if (gone) {
          EngineOutput out;
          out.finish_reason = "error";
          out.error = unavailable(fmt::format(
              "no prefill instance of scenario '{}' has been reachable for {} ms: every one this request "
              "could go to is down or going away; retry later",
              options_.scenario, options_.prefill_away_wait_ms));
          end(f, std::move(out));
        } else if (full || !try_place(f, /*queued=*/true)) {
          full = true;
          if (f->assigned == static_cast<int>(i)) {
            keep_queues[i].push_back(f);
          } else {
            hold(f);  // its prefill went away: it joined another queue
          }
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    dispatching_ = false;
    // Both in deadline order; among equals, those that waited here first.
    std::deque<std::shared_ptr<Flight>> merged;
    std::merge(keep_waiting.begin(), keep_waiting.end(), waiting_.begin(), waiting_.end(),
               std::back_inserter(merged),
               [](const std::shared_ptr<Flight>& a, const std::shared_ptr<Flight>& b) {
                 return a->deadline < b->deadline;
               });
    waiting_.swap(merged);
    to_decode_.insert(to_decode_.begin(), keep_decode.begin(), keep_decode.end());
    for (size_t i = 0; i < keep_queues.size(); ++i) {
      prefill_queues_[i].insert(prefill_queues_[i].begin(), keep_queues[i].begin(), keep_queues[i].end());
    }
  }
}

EngineMetrics Router::metrics() const {
  EngineMetrics m;
  for (const Instance* e : prefills_) add_metrics(m, e->metrics());
  for (const Instance* e : decodes_) add_metrics(m, e->metrics());
  std::lock_guard<std::mutex> lock(mu_);
  m.gateway_waiting = static_cast<int32_t>(waiting_.size() + to_decode_.size());
  for (const auto& q : prefill_queues_) m.gateway_waiting += static_cast<int32_t>(q.size());
  m.gateway_timeouts_total = timeouts_total_;
  m.gateway_rejections_total = rejections_total_;
  m.gateway_room_rejections_total = room_rejections_total_;
  m.gateway_prefill_retries_total = prefill_retries_total_;
  m.scenarios.push_back({.name = options_.scenario,
                         .requests_total = requests_total_,
                         .waiting = m.gateway_waiting,
                         .timeouts_total = timeouts_total_});
  return m;
}

}  // namespace pdserve
