// RemoteInstance: an instance in another process, reached over the internal API
// (api/internal_protocol.h) — what the gateway's Router holds for `pdserve gateway`.
//
// submit() and submit_handoff() are try-accept calls: they return once the instance has accepted
// (200) or refused (429 → kResourceExhausted, other errors as sent); an instance that cannot be
// reached is kUnavailable, so the router asks the next one. An accepted request's events are read
// asynchronously by a StreamReactor's threads, shared by every stream (of every instance given the
// same reactor), which call the sink (and on_pulled) in order — one stream's calls never overlap,
// different streams' run side by side. Cancelling the request's handle closes the connection
// within poll_interval (the instance cancels it) and ends it "cancelled" here. A stream that
// breaks before its final event (the instance died) ends with an error naming the instance at
// once (a peer that vanishes without closing: within about 10 s, by TCP keepalive). A try-accept's
// answer and the control calls (stats, release) time out after connect_timeout.
//
// A background thread reads the instance's stats every stats_interval: metrics() reports the
// latest, and an instance that stops answering is marked down (submissions fail at once with
// kUnavailable) until it answers again — a restarted instance rejoins by itself.
//
// NOTE: sinks run on the reactor's threads and may make blocking calls to other instances (a
// handoff's try-accept, a release): each such call holds one thread for its round trip, so a
// reactor has a few threads, not one per stream; the try-accepts themselves stay synchronous.
// Thread-safety: every method is thread-safe. shutdown() before destroying the router that owns
// the sinks; never from a sink.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/host_port.h"
#include "engine/engine.h"

namespace pdserve {

// The threads that read remote instances' event streams and run their sinks. Shared by the
// instances of a gateway; it outlives them (they hold it).
class StreamReactor {
 public:
  explicit StreamReactor(int threads);
  ~StreamReactor();  // stops and joins its threads
  StreamReactor(const StreamReactor&) = delete;
  StreamReactor& operator=(const StreamReactor&) = delete;

  int threads() const { return threads_; }

  struct Impl;  // Asio's io_context and the threads that run it (remote_instance.cpp)
  Impl& impl() { return *impl_; }

 private:
  void stop_and_join();

  int threads_;
  std::unique_ptr<Impl> impl_;
};

struct RemoteInstanceOptions {
  std::chrono::milliseconds connect_timeout{2'000};
  std::chrono::milliseconds stats_interval{200};
  // How often the instance looks for cancelled streams (also how long shutdown() may wait for them).
  std::chrono::milliseconds poll_interval{20};
  std::string token;  // sent as "Authorization: Bearer TOKEN" on every call (empty: none)
  // Reads the streams (null: the instance makes its own of kDefaultStreamThreads threads; a
  // gateway shares one among its instances, `--stream-threads`).
  std::shared_ptr<StreamReactor> reactor;
};

inline constexpr int kDefaultStreamThreads = 2;

class RemoteInstance : public Instance {
 public:
  // `address` is host:port of the instance's internal API. Reads its stats once: an instance
  // that does not answer is kUnavailable.
  static StatusOr<std::unique_ptr<RemoteInstance>> connect(const std::string& address,
                                                           const RemoteInstanceOptions& options = {});
  ~RemoteInstance() override;  // shutdown()
  RemoteInstance(const RemoteInstance&) = delete;
  RemoteInstance& operator=(const RemoteInstance&) = delete;

  // Cancels every open stream and returns once each has ended (its sink got its last call: the
  // final event if it had already arrived, else "cancelled"); joins the stats thread. Later
  // submissions are kUnavailable. Idempotent.
  void shutdown();

  const std::string& address() const { return address_; }
  uint64_t model_fingerprint() const { return fingerprint_; }
  const std::string& transport() const { return transport_; }
  // "f16" (a CPU's KV), "bf16" (a GPU's), or "" from an instance that does not say.
  const std::string& kv_dtype() const { return kv_dtype_; }

  EngineRole role() const override { return role_; }
  int32_t max_context() const override { return max_context_; }
  int64_t max_sequence_tokens() const override { return max_sequence_tokens_; }
  // The checks that need no model (the instance checks the rest when it is asked).
  Status validate(const EngineRequest& request) const override;
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override;
  using GenerationBackend::submit;
  StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest request, const EngineHandoff& handoff,
                                                          OutputSink sink, PulledCallback on_pulled,
                                                          std::shared_ptr<RequestHandle> handle) override;
  Status release_handoff(const KvBufferRef& kv) override;
  EngineMetrics metrics() const override;

 private:
  struct Stream;  // one accepted request's connection (remote_instance.cpp)

  RemoteInstance(std::string address, const HostPort& where, const RemoteInstanceOptions& options);
  Status refresh_stats();
  StatusOr<std::shared_ptr<RequestHandle>> start(const std::string& path, std::string body, OutputSink sink,
                                                 PulledCallback on_pulled,
                                                 std::shared_ptr<RequestHandle> handle);
  void poll_stats();
  // Every poll_interval on the reactor: hands cancelled streams (all of them once stopping) their
  // cancellation, again each time until they end; ends itself once stopping and no stream is left.
  void sweep();
  void arm_sweep();
  // On a stream's strand: the next read, what it brought, and the stream's end.
  void read_next(const std::shared_ptr<Stream>& s);
  void on_read(const std::shared_ptr<Stream>& s);
  void finish(const std::shared_ptr<Stream>& s);

  std::string address_;
  std::string host_;
  std::string port_;
  RemoteInstanceOptions options_;
  EngineRole role_ = EngineRole::kMixed;
  int32_t max_context_ = 0;
  int64_t max_sequence_tokens_ = 0;
  uint64_t fingerprint_ = 0;
  std::string transport_;
  std::string kv_dtype_;
  std::vector<std::string> features_;  // request fields it acts on (api::instance_features())
  bool identified_ = false;            // guarded by mu_; the fields above are set once, by connect()

  std::atomic<bool> up_{true};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  EngineMetrics metrics_;                       // guarded by mu_
  std::list<std::shared_ptr<Stream>> streams_;  // guarded by mu_: open streams
  bool stop_ = false;                           // guarded by mu_
  bool sweeping_ = false;                       // guarded by mu_: the sweep is armed
  std::thread stats_thread_;
  std::shared_ptr<StreamReactor> reactor_;
  struct Sweep;  // the sweep's timer (remote_instance.cpp)
  std::unique_ptr<Sweep> sweep_;
};

}  // namespace pdserve
