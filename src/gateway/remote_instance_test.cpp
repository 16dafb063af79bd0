// RemoteInstance against an instance's internal API served by a real HttpServer on loopback: the
// instance side here is scripted (which events each stream gets, and when), so the client's
// reading — many streams on a few threads, order, cancellation, broken and malformed streams,
// shutdown — is checked event by event.
#include "gateway/remote_instance.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "api/http_server.h"
#include "api/internal_protocol.h"

namespace pdserve {
namespace {

using namespace std::chrono_literals;

std::string frame(const api::StreamEvent& e) { return "data: " + api::encode_stream_event(e) + "\n\n"; }

EngineOutput token_event(int32_t token) {
  EngineOutput out;
  out.tokens = {GeneratedToken{.id = token}};
  return out;
}

EngineOutput final_event(int32_t token) {
  EngineOutput out = token_event(token);
  out.finished = true;
  out.finish_reason = "length";
  return out;
}

// A prefill instance whose streams the test drives: each accepted submit (or handoff) is kept (by
// the first prompt token, which the tests make unique) until the test writes to it or ends it. A
// request whose first token is kStall or more is never answered.
class ScriptedInstance {
 public:
  // `accept`: how many submits get 200 (the rest 429).
  explicit ScriptedInstance(int accept = 1 << 20) : accept_(accept) {
    api::HttpServerOptions o;
    o.port = 0;
    o.num_threads = 2;
    o.error_response = [](int status, std::string message) {
      return api::HttpResponse{status, "application/json", api::encode_status(unavailable(message)), {}};
    };
    auto s = api::HttpServer::start(std::move(o),
                                    [this](api::HttpRequest r, std::shared_ptr<api::ResponseChannel> ch) {
                                      handle(std::move(r), std::move(ch));
                                    });
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    server_ = std::move(s).value();
  }

  // The server stops before the members its callbacks use go, and outlives the channels.
  ~ScriptedInstance() {
    server_->stop();
    std::lock_guard<std::mutex> lock(mu_);
    streams_.clear();
    stalled_.clear();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(server_->port()); }

  // Writes raw bytes to stream `id` (on its connection's thread).
  void write(int32_t id, std::string bytes) {
    std::shared_ptr<api::ResponseChannel> ch = channel(id);
    ch->post([ch, b = std::move(bytes)]() mutable { ch->write(std::move(b)); });
  }
  void send(int32_t id, const api::StreamEvent& e) { write(id, frame(e)); }
  void end(int32_t id) {
    std::shared_ptr<api::ResponseChannel> ch = channel(id);
    ch->post([ch] { ch->end_stream(); });
  }
  // Waits until `n` streams were accepted.
  bool wait_accepted(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return streams_.size() >= n; });
  }
  // Waits until `n` accepted streams' connections closed (the gateway cancelled them).
  bool wait_closed(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return closed_ >= n; });
  }
  void stop() { server_->stop(); }

 private:
  std::shared_ptr<api::ResponseChannel> channel(int32_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return streams_.at(id);
  }

  void handle(api::HttpRequest r, std::shared_ptr<api::ResponseChannel> ch) {
    if (r.path == "/internal/v1/stats") {
      api::InstanceStats st;
      st.role = EngineRole::kPrefill;
      st.max_context = 512;
      st.max_sequence_tokens = 1024;
      st.model_fingerprint = 7;
      st.transport = "inproc";
      ch->respond(api::HttpResponse{200, "application/json", api::encode_instance_stats(st), {}});
      return;
    }
    EngineRequest req;
    if (r.path == "/internal/v1/handoff") {
      auto h = api::decode_handoff_request(r.body);
      ASSERT_TRUE(h.ok()) << h.status().to_string();
      req = h->first;
    } else {
      auto e = api::decode_engine_request(r.body);
      ASSERT_TRUE(e.ok()) << e.status().to_string();
      req = *e;
    }
    const int32_t id = req.prompt.at(0);
    std::lock_guard<std::mutex> lock(mu_);
    if (id >= kStall) {
      stalled_.push_back(std::move(ch));
      return;
    }
    if (static_cast<int>(streams_.size()) >= accept_) {
      ch->respond(api::HttpResponse{
          429, "application/json", api::encode_status(resource_exhausted("every slot is taken")), {}});
      return;
    }
    ch->on_close([this] {
      std::lock_guard<std::mutex> l(mu_);
      ++closed_;
      cv_.notify_all();
    });
    ch->start_stream(200, "text/event-stream");
    streams_[id] = ch;
    cv_.notify_all();
  }

 public:
  static constexpr int32_t kStall = 1 << 20;

 private:
  const int accept_;
  std::vector<std::shared_ptr<api::ResponseChannel>> stalled_;  // guarded by mu_
  std::unique_ptr<api::HttpServer> server_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int32_t, std::shared_ptr<api::ResponseChannel>> streams_;  // guarded by mu_
  int closed_ = 0;                                                    // guarded by mu_
};

// What one stream's sink saw, checked for calls that overlap.
struct Seen {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;
  bool finished = false;
  std::string finish_reason;
  Status error = ok_status();
  std::atomic<int> inside{0};
  std::atomic<bool> overlapped{false};

  OutputSink sink() {
    return [this](EngineOutput&& o) {
      if (inside.fetch_add(1) != 0) overlapped = true;
      {
        std::lock_guard<std::mutex> lock(mu);
        for (const GeneratedToken& t : o.tokens) tokens.push_back(t.id);
        if (o.finished) {
          finished = true;
          finish_reason = o.finish_reason;
          error = o.error;
        }
      }
      inside.fetch_sub(1);
      cv.notify_all();
    };
  }
  bool wait_tokens(size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, 10s, [&] { return tokens.size() >= n; });
  }
  bool wait_finished() {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, 10s, [&] { return finished; });
  }
};

EngineHandoff handoff() {
  EngineHandoff h;
  h.kv.bytes = kKvWireHeaderBytes;
  h.kv.endpoint = "inproc/1";
  h.first_token = 7;
  h.num_prompt_tokens = 3;
  return h;
}

EngineRequest request(int32_t id) {
  EngineRequest r;
  r.prompt = {id, 1, 2};
  r.max_tokens = 4;
  return r;
}

int process_threads() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

std::unique_ptr<RemoteInstance> connect_to(const ScriptedInstance& inst,
                                           std::shared_ptr<StreamReactor> reactor,
                                           RemoteInstanceOptions o = {}) {
  o.reactor = std::move(reactor);
  auto r = RemoteInstance::connect(inst.address(), o);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return std::move(r).value();
}

// NOTE: in every test the sinks' state is declared before the RemoteInstance, so that shutting it
// down (its destructor) still finds them when a failed assertion leaves streams open.

TEST(RemoteInstanceTest, ManyStreamsOnAFewThreadsEachInOrder) {
  constexpr int kStreams = 200;
  std::vector<std::unique_ptr<Seen>> seen;
  for (int i = 0; i < kStreams; ++i) seen.push_back(std::make_unique<Seen>());
  ScriptedInstance inst;
  auto remote = connect_to(inst, std::make_shared<StreamReactor>(2));
  const int before = process_threads();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(remote->submit(request(1000 + i), seen[static_cast<size_t>(i)]->sink(), nullptr).ok()) << i;
  }
  ASSERT_TRUE(inst.wait_accepted(kStreams));
  // Every stream open at once: the gateway has no thread of its own for any of them.
  EXPECT_LE(process_threads(), before + 1);
  for (int t = 0; t < 3; ++t) {
    for (int i = 0; i < kStreams; ++i) inst.send(1000 + i, token_event(i * 10 + t));
  }
  for (int i = 0; i < kStreams; ++i) inst.send(1000 + i, final_event(i * 10 + 3));
  for (int i = 0; i < kStreams; ++i) {
    Seen& s = *seen[static_cast<size_t>(i)];
    ASSERT_TRUE(s.wait_finished()) << i;
    EXPECT_EQ(s.tokens, (std::vector<int32_t>{i * 10, i * 10 + 1, i * 10 + 2, i * 10 + 3})) << i;
    EXPECT_EQ(s.finish_reason, "length");
    EXPECT_FALSE(s.overlapped.load()) << i;
  }
  remote->shutdown();
}

// Holds a sink's first call until let_through() — or until the gate goes, so that a failed
// assertion never leaves a sink blocked.
struct Gate {
  std::promise<void> open, entered;
  std::shared_future<void> opened = open.get_future().share();
  bool is_open = false;
  bool first = true;  // read by the sink (one stream's calls never overlap)

  OutputSink hold_first(OutputSink inner) {
    return [this, inner = std::move(inner)](EngineOutput&& o) {
      if (std::exchange(first, false)) {
        entered.set_value();
        opened.wait();
      }
      inner(std::move(o));
    };
  }
  bool wait_entered() { return entered.get_future().wait_for(10s) == std::future_status::ready; }
  void let_through() {
    if (!std::exchange(is_open, true)) open.set_value();
  }
  ~Gate() { let_through(); }
};

TEST(RemoteInstanceTest, ABlockedSinkDoesNotHoldTheOtherStreams) {
  Seen a, b;
  Gate gate;
  ScriptedInstance inst;
  auto remote = connect_to(inst, std::make_shared<StreamReactor>(2));
  // Stream 1's sink blocks (as a sink's call to another instance would) until stream 2 has ended.
  ASSERT_TRUE(remote->submit(request(1), gate.hold_first(a.sink()), nullptr).ok());
  ASSERT_TRUE(remote->submit(request(2), b.sink(), nullptr).ok());
  ASSERT_TRUE(inst.wait_accepted(2));
  inst.send(1, token_event(11));
  ASSERT_TRUE(gate.wait_entered());
  inst.send(2, token_event(21));
  inst.send(2, final_event(22));
  ASSERT_TRUE(b.wait_finished());
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{21, 22}));
  gate.let_through();
  inst.send(1, final_event(12));
  ASSERT_TRUE(a.wait_finished());
  EXPECT_EQ(a.tokens, (std::vector<int32_t>{11, 12}));
}

// The router's pattern: a sink that makes a try-accept call to another instance, on a reactor of
// one thread that both instances share.
TEST(RemoteInstanceTest, ASinkMayCallAnotherInstanceOnTheSameReactor) {
  Seen a, b, c;
  std::atomic<bool> submitted{false};
  ScriptedInstance first, second;
  auto reactor = std::make_shared<StreamReactor>(1);
  auto remote_b = connect_to(second, reactor);
  auto remote_a = connect_to(first, reactor);
  OutputSink inner = a.sink();
  OutputSink hand_on = [&](EngineOutput&& o) {
    if (o.finished) submitted = remote_b->submit(request(2), b.sink(), nullptr).ok();
    inner(std::move(o));
  };
  ASSERT_TRUE(remote_a->submit(request(1), std::move(hand_on), nullptr).ok());
  ASSERT_TRUE(first.wait_accepted(1));
  first.send(1, final_event(10));
  ASSERT_TRUE(a.wait_finished());
  EXPECT_TRUE(submitted.load());
  ASSERT_TRUE(second.wait_accepted(1));
  second.send(2, token_event(20));
  second.send(2, final_event(21));
  ASSERT_TRUE(b.wait_finished());
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{20, 21}));
  // One instance going away leaves the other's streams on the shared reactor alone.
  ASSERT_TRUE(remote_b->submit(request(3), c.sink(), nullptr).ok());
  ASSERT_TRUE(second.wait_accepted(2));
  remote_a->shutdown();
  second.send(3, final_event(30));
  ASSERT_TRUE(c.wait_finished());
  EXPECT_EQ(c.finish_reason, "length");
  remote_b->shutdown();
}

TEST(RemoteInstanceTest, CancelClosesTheConnectionAndEndsTheStream) {
  Seen s;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  auto handle = remote->submit(request(5), s.sink(), nullptr);
  ASSERT_TRUE(handle.ok());
  ASSERT_TRUE(inst.wait_accepted(1));
  inst.send(5, token_event(50));
  ASSERT_TRUE(s.wait_tokens(1));
  (*handle)->cancel();
  ASSERT_TRUE(s.wait_finished());
  EXPECT_EQ(s.finish_reason, "cancelled");
  EXPECT_TRUE(s.error.ok());
  EXPECT_TRUE(inst.wait_closed(1));  // the instance sees the disconnect and cancels its request
}

// A final event that arrived before the cancellation was acted on still reaches the sink (a
// prefill's handoff: the router must see it to release the staged KV).
TEST(RemoteInstanceTest, AFinalEventThatArrivedIsDeliveredDespiteACancel) {
  Seen s;
  Gate gate;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  auto handle = remote->submit(request(4), gate.hold_first(s.sink()), nullptr);
  ASSERT_TRUE(handle.ok());
  ASSERT_TRUE(inst.wait_accepted(1));
  inst.send(4, token_event(40));
  ASSERT_TRUE(gate.wait_entered());
  inst.send(4, final_event(41));
  (*handle)->cancel();
  std::this_thread::sleep_for(100ms);  // several sweeps see the cancellation meanwhile
  gate.let_through();
  ASSERT_TRUE(s.wait_finished());
  EXPECT_EQ(s.finish_reason, "length");
  EXPECT_EQ(s.tokens, (std::vector<int32_t>{40, 41}));
}

TEST(RemoteInstanceTest, AHandoffStreamReportsThePullOnce) {
  Seen s1, s2;
  std::vector<Status> pulled1, pulled2;
  std::mutex mu;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  auto record = [&](std::vector<Status>& into) {
    return [&](const Status& st) {
      std::lock_guard<std::mutex> lock(mu);
      into.push_back(st);
    };
  };
  ASSERT_TRUE(remote->submit_handoff(request(1), handoff(), s1.sink(), record(pulled1), nullptr).ok());
  ASSERT_TRUE(remote->submit_handoff(request(2), handoff(), s2.sink(), record(pulled2), nullptr).ok());
  ASSERT_TRUE(inst.wait_accepted(2));
  inst.send(1, api::PulledEvent{ok_status()});
  inst.send(1, token_event(10));
  inst.send(1, final_event(11));
  ASSERT_TRUE(s1.wait_finished());
  // The second decode goes away before it says whether it has the KV.
  inst.end(2);
  ASSERT_TRUE(s2.wait_finished());
  EXPECT_EQ(s2.finish_reason, "error");
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(pulled1.size(), 1u);
  EXPECT_TRUE(pulled1[0].ok()) << pulled1[0].to_string();
  ASSERT_EQ(pulled2.size(), 1u);
  EXPECT_EQ(pulled2[0].code(), StatusCode::kUnavailable) << pulled2[0].to_string();
}

TEST(RemoteInstanceTest, AStreamThatEndsWithoutItsFinalEventIsAnError) {
  Seen s;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  ASSERT_TRUE(remote->submit(request(6), s.sink(), nullptr).ok());
  ASSERT_TRUE(inst.wait_accepted(1));
  inst.send(6, token_event(60));
  inst.end(6);
  ASSERT_TRUE(s.wait_finished());
  EXPECT_EQ(s.tokens, std::vector<int32_t>{60});
  EXPECT_EQ(s.finish_reason, "error");
  EXPECT_EQ(s.error.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.error.message().find("the prefill instance at " + inst.address()), std::string::npos)
      << s.error.message();
}

TEST(RemoteInstanceTest, AnInstanceThatGoesAwayEndsItsStreamsWithAnError) {
  Seen s1, s2;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  ASSERT_TRUE(remote->submit(request(1), s1.sink(), nullptr).ok());
  ASSERT_TRUE(remote->submit(request(2), s2.sink(), nullptr).ok());
  ASSERT_TRUE(inst.wait_accepted(2));
  inst.stop();
  for (Seen* s : {&s1, &s2}) {
    ASSERT_TRUE(s->wait_finished());
    EXPECT_EQ(s->finish_reason, "error");
    EXPECT_EQ(s->error.code(), StatusCode::kUnavailable) << s->error.to_string();
  }
}

TEST(RemoteInstanceTest, AMalformedEventIsDataLoss) {
  Seen s;
  ScriptedInstance inst;
  auto remote = connect_to(inst, nullptr);
  ASSERT_TRUE(remote->submit(request(8), s.sink(), nullptr).ok());
  ASSERT_TRUE(inst.wait_accepted(1));
  inst.send(8, token_event(80));
  inst.write(8, "data: {\"tokens\": \"not a list\"}\n\n");
  ASSERT_TRUE(s.wait_finished());
  EXPECT_EQ(s.tokens, std::vector<int32_t>{80});
  EXPECT_EQ(s.error.code(), StatusCode::kDataLoss) << s.error.to_string();
  EXPECT_TRUE(inst.wait_closed(1));
}

// The scripted instance's stats name no features, as an older build's would: a request using a
// newer field is refused before it goes there, since that instance would ignore the field.
TEST(RemoteInstanceTest, AnOlderInstanceIsNotSentFieldsItWouldIgnore) {
  ScriptedInstance inst(/*accept=*/1);
  auto remote = connect_to(inst, nullptr);
  EXPECT_TRUE(remote->validate(request(1)).ok());
  EngineRequest biased = request(1);
  biased.sampling.logit_bias = {{2, -100.0f}};
  Status st = remote->validate(biased);
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("runs an older pdserve, which would ignore the request's logit_bias"),
            std::string::npos)
      << st.to_string();
  EngineRequest json = request(1);
  json.response_format = ResponseFormat::kJsonObject;
  EXPECT_NE(remote->validate(json).message().find("json_object"), std::string::npos);
}

TEST(RemoteInstanceTest, ARefusalIsResourceExhaustedAndOpensNoStream) {
  Seen s1, s2;
  ScriptedInstance inst(/*accept=*/1);
  auto remote = connect_to(inst, nullptr);
  ASSERT_TRUE(remote->submit(request(1), s1.sink(), nullptr).ok());
  auto refused = remote->submit(request(2), s2.sink(), nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status().to_string();
  inst.send(1, final_event(3));
  ASSERT_TRUE(s1.wait_finished());
  std::lock_guard<std::mutex> lock(s2.mu);
  EXPECT_TRUE(s2.tokens.empty());
  EXPECT_FALSE(s2.finished);
}

// An instance that takes the call and never answers it: the try-accept fails after
// connect_timeout instead of holding the caller (on the reactor, for a handoff) for good.
TEST(RemoteInstanceTest, ATryAcceptThatIsNeverAnsweredTimesOut) {
  Seen s;
  ScriptedInstance inst;
  RemoteInstanceOptions o;
  o.connect_timeout = 300ms;
  auto remote = connect_to(inst, nullptr, o);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = remote->submit(request(ScriptedInstance::kStall), s.sink(), nullptr);
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().to_string();
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 5s);
}

// A peer below HTTP: answers the stats call properly, then starts every other answer's head and
// stalls in the middle of it.
class StallingPeer {
 public:
  StallingPeer() {
    listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    EXPECT_EQ(::bind(listener_, reinterpret_cast<sockaddr*>(&a), len), 0);
    EXPECT_EQ(::listen(listener_, 16), 0);
    EXPECT_EQ(::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len), 0);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~StallingPeer() {
    ::shutdown(listener_, SHUT_RDWR);
    thread_.join();
    ::close(listener_);
    for (int fd : held_) ::close(fd);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  void serve() {
    for (;;) {
      const int fd = ::accept(listener_, nullptr, nullptr);
      if (fd < 0) return;
      char buf[4096];
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0 && std::string_view(buf, static_cast<size_t>(n)).starts_with("GET /internal/v1/stats")) {
        api::InstanceStats st;
        st.role = EngineRole::kDecode;
        st.max_context = 512;
        st.max_sequence_tokens = 1024;
        const std::string body = api::encode_instance_stats(st);
        const std::string answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                                   std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
        EXPECT_EQ(::send(fd, answer.data(), answer.size(), MSG_NOSIGNAL),
                  static_cast<ssize_t>(answer.size()));
        ::close(fd);
        continue;
      }
      const std::string_view part = "HTTP/1.1 200 OK\r\nContent-Type: text/ev";
      EXPECT_EQ(::send(fd, part.data(), part.size(), MSG_NOSIGNAL), static_cast<ssize_t>(part.size()));
      held_.push_back(fd);  // never finished (the thread owns held_ until it ends)
    }
  }

  int listener_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
  std::vector<int> held_;
};

// An answer whose head stops half way: the try-accept fails after connect_timeout (a blocking
// read would wait for the rest for good, holding a reactor thread when a sink made the call).
TEST(RemoteInstanceTest, ATryAcceptWhoseAnswerStallsTimesOut) {
  Seen s;
  StallingPeer peer;
  RemoteInstanceOptions o;
  o.connect_timeout = 300ms;
  auto r = RemoteInstance::connect(peer.address(), o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const auto t0 = std::chrono::steady_clock::now();
  auto submitted = (*r)->submit_handoff(request(1), handoff(), s.sink(), nullptr, nullptr);
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(submitted.ok());
  EXPECT_EQ(submitted.status().code(), StatusCode::kUnavailable) << submitted.status().to_string();
  EXPECT_NE(submitted.status().message().find("timed out"), std::string::npos)
      << submitted.status().to_string();
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 5s);
  (*r)->shutdown();
}

TEST(RemoteInstanceTest, ShutdownEndsEveryOpenStreamAsCancelled) {
  std::vector<std::unique_ptr<Seen>> seen;
  for (int i = 0; i < 20; ++i) seen.push_back(std::make_unique<Seen>());
  ScriptedInstance inst;
  auto remote = connect_to(inst, std::make_shared<StreamReactor>(1));
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(remote->submit(request(i), seen[static_cast<size_t>(i)]->sink(), nullptr).ok());
  }
  ASSERT_TRUE(inst.wait_accepted(20));
  for (int i = 0; i < 20; ++i) inst.send(i, token_event(i));
  for (auto& s : seen) ASSERT_TRUE(s->wait_tokens(1));
  remote->shutdown();  // returns once every stream has ended
  for (auto& s : seen) {
    std::lock_guard<std::mutex> lock(s->mu);
    EXPECT_TRUE(s->finished);
    EXPECT_EQ(s->finish_reason, "cancelled");
  }
  EXPECT_TRUE(inst.wait_closed(20));
  Seen late_seen;
  auto late = remote->submit(request(99), late_seen.sink(), nullptr);
  EXPECT_FALSE(late.ok());
}

}  // namespace
}  // namespace pdserve
