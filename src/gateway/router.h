// Router: the gateway's global scheduling over prefill and decode instances (DESIGN.md §1 items 2
// and 3, §2 "Life of a disaggregated request"), here for instances in this process.
//
// On-demand forwarding: a request is offered to the prefills one after another, ranked by their
// open streams (fewest first); the first with a free slot takes it, a full one refuses at once
// (prefills keep no queue). When none accepts, the request waits here within its TTFT budget (a
// base plus a per-prompt-token allowance), the one due first ahead (first come, first served
// among equal budgets); capacity freed anywhere (a prefill slot, a decode pending place) retries
// the waiting requests in that order; one that no prefill takes holds back those due later (they
// would be refused alike), except one refused only for room in the prefills' KV send buffers
// (Status::reason() kSendPoolNoRoom): shorter prompts behind it may still fit and go ahead while
// it has at least half its budget left — then nothing behind it is offered, so that room frees
// for it (as far as this gateway goes: other gateways may still take it). Each offer tells the
// prefill what is left of the budget and the queue's id (EngineRequest::wait_budget_us,
// wait_queue), so that a prefill that refused requests of several gateways keeps its next free
// slot for the most urgent of them (EngineOptions::deadline_priority_ms). A request still
// waiting when its budget runs out ends with a DEADLINE_EXCEEDED error that names the scenario
// and how long it waited; budgets are checked before a prefill starts, never by interrupting one.
//
// Baseline admission (the paper's comparison): each request joins, at once, the queue of the
// prefill with the fewest open streams (queued requests included; among equals, one at random, so
// that gateways that do not share their counts do not all pick the same) and waits there in order,
// whatever the other prefills do — a FIFO queue in each prefill: the request asks to queue
// (EngineRequest::queue_if_full) and the prefill keeps it in its own queue, shared by every
// gateway, until a slot frees; one the prefill refuses even so waits here, in a queue for that
// prefill. Both policies run on the same instances. No TTFT budget applies to it.
//
// The prefill streams the first token to the client; its handoff goes to the decode with the
// fewest requests in hand, which pulls the KV when it has room, tells the prefill to release it
// (on_pulled), and streams the rest. A request whose prefill fails before the first token is
// retried on another prefill (once per prefill; a prefill that went away with it — kUnavailable,
// e.g. shut down with the request still in its queue — is asked again after the others, once,
// since it may be back; a baseline request, which has no TTFT budget, waits for it when no other
// prefill is left, until every prefill it could go to has been away for prefill_away_wait_ms). The client's
// RequestHandle is shared with whichever engine holds the request, so cancellation reaches it.
//
// Layer-wise KV (a prefill's early handoff, before its forward pass ends): the handoff goes to a
// decode at once, as one attempt with its own RequestHandle (a child of the client's), so the
// decode pulls each layer as the prefill writes it. If no decode takes it then, the handoff after
// the first token goes the usual way. If the prefill then ends the request otherwise (an error
// before the first token, a stop at it, a cancel), that attempt is cancelled and its outputs
// dropped; the request is retried or ended as above. Outputs reach the client in order: a
// decode's before the prefill's first token are held back until it has gone.
//
// Thread-safety: all public methods are thread-safe. Sinks run on engine threads; one router
// thread retries waiting requests and enforces budgets. The engines must outlive the router.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"

namespace pdserve {

enum class AdmissionPolicy {
  kOnDemand,  // try-accept in rank order, wait at the gateway (P/D-Serve)
  kBaseline,  // a FIFO queue per prefill, joined at arrival (fewest open streams)
};

struct RouterOptions {
  AdmissionPolicy admission = AdmissionPolicy::kOnDemand;
  std::string scenario = "default";  // named in timeout errors and metrics
  // TTFT budget for waiting at the gateway: base + per_token × prompt tokens.
  int64_t ttft_budget_ms = 10'000;
  double ttft_budget_ms_per_token = 0.0;
  // A handed-off request that no decode takes within this fails (and its prefill KV is released).
  int64_t decode_wait_ms = 30'000;
  // Baseline admission, which has no TTFT budget: a request held while every prefill it could
  // still go to has been found away (kUnavailable) for this long fails with UNAVAILABLE. Not in
  // the cluster file: the baseline is for comparisons.
  int64_t prefill_away_wait_ms = 30'000;
};

class Router : public GenerationBackend {
 public:
  // prefills: instances with EngineRole::kPrefill; decodes: kDecode. Both non-empty. For engines
  // in this process, set EngineOptions::on_capacity to call notify_capacity(); remote instances
  // are retried on the router's own events and its 10 ms tick.
  Router(std::vector<Instance*> prefills, std::vector<Instance*> decodes, const RouterOptions& options);
  ~Router() override;  // stop()
  // Stops retrying and ends the requests held here as "cancelled" (releasing their prefills'
  // KV). Shut down in this order: router.stop(), every engine's shutdown(), then destroy: engines
  // call back into the router until they stop, and the router into engines until it stops.
  void stop();
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  int32_t max_context() const override;
  int64_t max_sequence_tokens() const override;
  Status validate(const EngineRequest& request) const override;
  // kResourceExhausted only when the gateway's own queue is full; otherwise the request is
  // placed or waits.
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override;
  using GenerationBackend::submit;
  // Sums over the instances, plus the gateway's own figures.
  EngineMetrics metrics() const override;

  // Capacity freed somewhere: retry what waits (cheap; any thread).
  void notify_capacity();

 private:
  struct Flight;  // one request on its way (router.cpp)

  // Offers the request to the prefills; true when one took it (or it ended).
  // `queued`: the router thread (or a retry) places a request that already waited, ahead of new ones.
  bool try_place(const std::shared_ptr<Flight>& f, bool queued = false);
  // Baseline admission: the prefill with the fewest open and queued streams among those `f` has
  // not failed on (a random one among equals; one found away only when no other is left);
  // prefills_.size() if none. Holds mu_.
  size_t least_loaded_locked(const Flight& f);
  // Gives a handed-off request to a decode; true when one took it (or it ended).
  bool try_hand_to_decode(const std::shared_ptr<Flight>& f);
  // Offers a prefill's handoff to the decodes, fewest requests first, as decode attempt `attempt`
  // under `handle`: OK when one took it; RESOURCE_EXHAUSTED when each was full or away; else the
  // first other refusal.
  Status offer_to_decodes(const std::shared_ptr<Flight>& f, size_t prefill_idx, const EngineHandoff& handoff,
                          int attempt, const std::shared_ptr<RequestHandle>& handle);
  // An early (layer-wise) handoff: offers it to the decodes now, as a new attempt.
  void hand_early(const std::shared_ptr<Flight>& f, size_t prefill_idx, const EngineHandoff& handoff);
  void on_prefill_output(const std::shared_ptr<Flight>& f, size_t prefill_idx, EngineOutput&& out);
  void on_decode_output(const std::shared_ptr<Flight>& f, size_t decode_idx, int attempt, EngineOutput&& out);
  // To the client, in order (Flight::out_mu held): a decode's output; the end.
  void deliver_decode_locked(Flight& f, EngineOutput&& out);
  void end_locked(Flight& f, EngineOutput&& last);
  void end(const std::shared_ptr<Flight>& f, EngineOutput&& last);
  void end_cancelled(const std::shared_ptr<Flight>& f);
  // On-demand: puts `f` into waiting_ behind every request due no later. Holds mu_.
  void insert_waiting_locked(const std::shared_ptr<Flight>& f);
  // Holds an unplaced request: at the gateway (on-demand) or in its prefill's queue (baseline).
  void hold(const std::shared_ptr<Flight>& f, bool front = false);
  // Holds a request here for the router thread (or ends it "cancelled" once stopped).
  void park(std::deque<std::shared_ptr<Flight>>& queue, const std::shared_ptr<Flight>& f, bool front = false);
  // Records how prefill `idx` answered: away (kUnavailable) or there. Holds mu_.
  void note_prefill_away_locked(size_t idx, bool away);
  // Baseline: whether every prefill `f` could still go to has been away since before `since`, found
  // so at least once a second since (one not asked lately may be back). Holds mu_.
  bool prefills_away_since_locked(const Flight& f, std::chrono::steady_clock::time_point since) const;
  // The same for prefill `idx` alone. Holds mu_.
  bool prefill_away_since_locked(size_t idx, std::chrono::steady_clock::time_point since) const;
  void loop();

  std::vector<Instance*> prefills_;
  std::vector<Instance*> decodes_;
  RouterOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Flight>> waiting_;    // guarded by mu_: no prefill yet, by deadline
  std::deque<std::shared_ptr<Flight>> to_decode_;  // guarded by mu_: handed off, no decode yet
  std::vector<int32_t> prefill_open_;              // guarded by mu_: open streams per prefill
  // guarded by mu_: baseline admission, the requests queued for each prefill. Sized once: its
  // elements are never moved (references to them are taken outside the lock).
  std::vector<std::deque<std::shared_ptr<Flight>>> prefill_queues_;
  std::minstd_rand tie_rng_{std::random_device{}()};  // guarded by mu_: baseline ties
  std::vector<int32_t> decode_open_;                  // guarded by mu_: requests per decode
  const uint64_t queue_id_;            // names waiting_ to prefills (EngineRequest::wait_queue); never 0
  bool retry_ = false;                 // guarded by mu_
  bool dispatching_ = false;           // guarded by mu_: the router thread holds the queues' contents
  bool stop_ = false;                  // guarded by mu_
  int64_t requests_total_ = 0;         // guarded by mu_
  int64_t timeouts_total_ = 0;         // guarded by mu_
  int64_t rejections_total_ = 0;       // guarded by mu_: prefill refusals seen
  int64_t room_rejections_total_ = 0;  // guarded by mu_: of those, for room (kSendPoolNoRoom)
  int64_t prefill_retries_total_ = 0;  // guarded by mu_
  // guarded by mu_: per prefill, since when offers and ends have found it away (kUnavailable;
  // the epoch while it answers otherwise), and when they last did
  std::vector<std::chrono::steady_clock::time_point> away_since_;
  std::vector<std::chrono::steady_clock::time_point> away_seen_;
  std::thread thread_;
};

}  // namespace pdserve
