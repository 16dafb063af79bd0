// HttpServer over real loopback sockets: keep-alive, pipelining, chunked streaming, 100-continue,
// body limit, malformed requests, and disconnect detection.
#include "api/http_server.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace pdserve::api {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

class Client {
 public:
  explicit Client(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~Client() { close(); }
  bool connected() const { return connected_; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool send(std::string_view s) {
    while (!s.empty()) {
      ssize_t n = ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      s.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // Reads until `done(buffer)` or EOF or the timeout; returns what was read.
  template <typename Done>
  std::string read_until(Done done, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!done(buf_)) {
      auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char tmp[65536];
      ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) {
        eof_ = true;
        break;
      }
      buf_.append(tmp, static_cast<size_t>(n));
    }
    return buf_;
  }
  std::string read_contains(std::string_view needle) {
    return read_until([&](const std::string& b) { return b.find(needle) != std::string::npos; });
  }
  std::string read_to_eof() {
    return read_until([](const std::string&) { return false; });
  }
  bool eof() const { return eof_; }
  void clear() { buf_.clear(); }

 private:
  int fd_ = -1;
  bool connected_ = false;
  bool eof_ = false;
  std::string buf_;
};

std::unique_ptr<HttpServer> start(RequestHandler handler, HttpServerOptions options = {}) {
  options.port = 0;
  options.num_threads = 2;
  if (!options.error_response) {
    options.error_response = [](int status, std::string message) {
      return HttpResponse{status, "application/json", "{\"error\":\"" + message + "\"}", {}};
    };
  }
  auto s = HttpServer::start(std::move(options), std::move(handler));
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  return std::move(s).value();
}

RequestHandler echo_handler() {
  return [](HttpRequest r, std::shared_ptr<ResponseChannel> ch) {
    ch->respond(HttpResponse{200, "text/plain", r.method + " " + r.target + " " + r.body, {{"X-Test", "1"}}});
  };
}

TEST(HttpServerTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  auto server = start(echo_handler());
  Client c(server->port());
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.send("GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"));
  std::string r1 = c.read_contains("GET /a?x=1 ");
  EXPECT_THAT(r1, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(r1, HasSubstr("Content-Length: 11\r\n"));
  EXPECT_THAT(r1, HasSubstr("Connection: keep-alive\r\n"));
  EXPECT_THAT(r1, HasSubstr("X-Test: 1\r\n"));
  c.clear();
  ASSERT_TRUE(c.send("POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"));
  EXPECT_THAT(c.read_contains("POST /b hello"), HasSubstr("POST /b hello"));
  EXPECT_EQ(server->num_connections(), 1);
}

TEST(HttpServerTest, PipelinedRequestsAreAnsweredInOrder) {
  auto server = start(echo_handler());
  Client c(server->port());
  ASSERT_TRUE(
      c.send("GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
             "GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"));
  std::string all = c.read_to_eof();
  size_t a = all.find("GET /1 "), b = all.find("GET /2 "), d = all.find("GET /3 ");
  ASSERT_NE(a, std::string::npos);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(d, std::string::npos);
  EXPECT_LT(a, b);
  EXPECT_LT(b, d);
  EXPECT_THAT(all, HasSubstr("Connection: close\r\n"));
  EXPECT_TRUE(c.eof());
}

TEST(HttpServerTest, StreamsChunksFromAnotherThread) {
  std::thread producer;
  auto server = start([&](HttpRequest, std::shared_ptr<ResponseChannel> ch) {
    ch->start_stream(200, "text/event-stream");
    producer = std::thread([ch] {
      for (int i = 0; i < 3; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        ch->write("data: " + std::to_string(i) + "\n\n");
      }
      ch->end_stream();
    });
  });
  Client c(server->port());
  ASSERT_TRUE(c.send("GET /s HTTP/1.1\r\nHost: h\r\n\r\n"));
  std::string r = c.read_contains("0\r\n\r\n");
  producer.join();
  EXPECT_THAT(r, HasSubstr("Transfer-Encoding: chunked\r\n"));
  EXPECT_THAT(r, HasSubstr("Content-Type: text/event-stream\r\n"));
  EXPECT_THAT(r, HasSubstr("9\r\ndata: 0\n\n\r\n"));
  EXPECT_THAT(r, HasSubstr("9\r\ndata: 2\n\n\r\n0\r\n\r\n"));
  // The connection stays usable after the stream.
  c.clear();
  ASSERT_TRUE(c.send("GET /again HTTP/1.1\r\nHost: h\r\n\r\n"));
  EXPECT_THAT(c.read_contains("0\r\n\r\n"), HasSubstr("200 OK"));
  if (producer.joinable()) producer.join();
}

TEST(HttpServerTest, BodyOverTheLimitIs413AndReachesTheClient) {
  HttpServerOptions o;
  o.max_body_bytes = 1000;
  auto server = start(echo_handler(), o);
  Client c(server->port());
  std::string body(200000, 'x');
  ASSERT_TRUE(
      c.send("POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n"));
  c.send(body);  // the server may already have answered and shut down its side
  std::string r = c.read_to_eof();
  EXPECT_THAT(r, StartsWith("HTTP/1.1 413 "));
  EXPECT_THAT(r, HasSubstr("larger than this server's limit of 1000 bytes"));
  EXPECT_THAT(r, HasSubstr("Connection: close\r\n"));
}

TEST(HttpServerTest, ChunkedBodyOverTheLimitIs413) {
  HttpServerOptions o;
  o.max_body_bytes = 10;
  auto server = start(echo_handler(), o);
  Client c(server->port());
  ASSERT_TRUE(c.send("POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" +
                     std::string(32, 'y') + "\r\n0\r\n\r\n"));
  EXPECT_THAT(c.read_to_eof(), StartsWith("HTTP/1.1 413 "));
}

TEST(HttpServerTest, ExpectContinue) {
  auto server = start(echo_handler());
  Client c(server->port());
  ASSERT_TRUE(c.send("POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"));
  EXPECT_THAT(c.read_contains("\r\n\r\n"), StartsWith("HTTP/1.1 100 Continue\r\n\r\n"));
  ASSERT_TRUE(c.send("abc"));
  EXPECT_THAT(c.read_contains("POST /e abc"), HasSubstr("200 OK"));
}

TEST(HttpServerTest, MalformedRequestIs400) {
  auto server = start(echo_handler());
  Client c(server->port());
  ASSERT_TRUE(c.send("THIS IS NOT HTTP\r\n\r\n"));
  std::string r = c.read_to_eof();
  EXPECT_THAT(r, StartsWith("HTTP/1.1 400 "));
  EXPECT_THAT(r, HasSubstr("malformed HTTP request"));
}

TEST(HttpServerTest, ClientDisconnectDuringAResponseFiresOnClose) {
  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;
  std::shared_ptr<ResponseChannel> kept;
  auto server = start([&](HttpRequest, std::shared_ptr<ResponseChannel> ch) {
    ch->start_stream(200, "text/event-stream");
    ch->write("data: first\n\n");
    ch->on_close([&] {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
      cv.notify_all();
    });
    std::lock_guard<std::mutex> lock(mu);
    kept = ch;  // never ends the stream
  });
  Client c(server->port());
  ASSERT_TRUE(c.send("GET /s HTTP/1.1\r\nHost: h\r\n\r\n"));
  c.read_contains("first");
  c.close();
  std::unique_lock<std::mutex> lock(mu);
  EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return closed; }));
  lock.unlock();
  kept->write("data: ignored\n\n");  // writes after the close are ignored
  kept.reset();
}

TEST(HttpServerTest, NonStreamingRequestsSeeTheDisconnectToo) {
  std::atomic<bool> closed{false};
  std::shared_ptr<ResponseChannel> kept;
  std::mutex mu;
  auto server = start([&](HttpRequest, std::shared_ptr<ResponseChannel> ch) {
    ch->on_close([&] { closed = true; });
    std::lock_guard<std::mutex> lock(mu);
    kept = ch;  // answers never
  });
  {
    Client c(server->port());
    ASSERT_TRUE(c.send("POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (int i = 0; i < 500 && !closed; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(closed);
  std::lock_guard<std::mutex> lock(mu);
  kept.reset();
}

TEST(HttpServerTest, IdleConnectionsAreClosed) {
  HttpServerOptions o;
  o.idle_timeout = std::chrono::milliseconds(100);
  auto server = start(echo_handler(), o);
  Client c(server->port());
  c.read_to_eof();
  EXPECT_TRUE(c.eof());
}

TEST(HttpServerTest, StopClosesOpenConnectionsAndFiresOnClose) {
  std::atomic<bool> closed{false};
  std::shared_ptr<ResponseChannel> kept;
  std::mutex mu;
  auto server = start([&](HttpRequest, std::shared_ptr<ResponseChannel> ch) {
    ch->start_stream(200, "text/event-stream");
    ch->on_close([&] { closed = true; });
    std::lock_guard<std::mutex> lock(mu);
    kept = ch;
  });
  Client c(server->port());
  ASSERT_TRUE(c.send("GET /s HTTP/1.1\r\nHost: h\r\n\r\n"));
  c.read_contains("\r\n\r\n");
  server->stop();
  EXPECT_TRUE(closed);
  c.read_to_eof();
  EXPECT_TRUE(c.eof());
  std::lock_guard<std::mutex> lock(mu);
  kept.reset();
}

TEST(HttpServerTest, ChannelsKeptPastTheServersDestructionDoNothingAndAreSafeToRelease) {
  std::mutex mu;
  std::vector<std::shared_ptr<ResponseChannel>> kept;  // guarded by mu
  auto server = start([&](HttpRequest r, std::shared_ptr<ResponseChannel> ch) {
    if (r.path == "/stream") ch->start_stream(200, "text/event-stream");
    std::lock_guard<std::mutex> lock(mu);
    kept.push_back(std::move(ch));
  });
  Client streaming(server->port());
  Client waiting(server->port());
  ASSERT_TRUE(streaming.send("GET /stream HTTP/1.1\r\nHost: h\r\n\r\n"));
  ASSERT_TRUE(waiting.send("GET /later HTTP/1.1\r\nHost: h\r\n\r\n"));
  streaming.read_contains("\r\n\r\n");
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (kept.size() == 2) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(kept.size(), 2u);
  server.reset();  // stopped and destroyed with both channels still held here

  std::atomic<int> ran{0};
  auto token = std::make_shared<int>(0);
  for (auto& ch : kept) {
    ch->write("data: late\n\n");
    ch->end_stream();
    ch->respond(HttpResponse{200, "text/plain", "late", {}});
    ch->on_close([&ran, token] { ++ran; });
    ch->post([&ran, token] { ++ran; });
  }
  EXPECT_EQ(token.use_count(), 1) << "functions given after the server's end were kept";
  kept.clear();  // frees the connections and what they shared with the server
  EXPECT_EQ(ran.load(), 0);
  streaming.read_to_eof();
  EXPECT_TRUE(streaming.eof());
  const std::string rest = waiting.read_to_eof();
  EXPECT_EQ(rest.find("late"), std::string::npos) << rest;
}

TEST(HttpServerTest, ManyConcurrentStreams) {
  constexpr int kClients = 200;
  std::mutex mu;
  std::vector<std::shared_ptr<ResponseChannel>> channels;
  auto server = start([&](HttpRequest, std::shared_ptr<ResponseChannel> ch) {
    ch->start_stream(200, "text/event-stream");
    std::lock_guard<std::mutex> lock(mu);
    channels.push_back(ch);
  });
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(std::make_unique<Client>(server->port()));
    ASSERT_TRUE(clients.back()->send("GET /s HTTP/1.1\r\nHost: h\r\n\r\n"));
  }
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (channels.size() == kClients) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(channels.size(), static_cast<size_t>(kClients));
    for (int round = 0; round < 10; ++round) {
      for (auto& ch : channels) ch->write("data: x\n\n");
    }
    for (auto& ch : channels) ch->end_stream();
  }
  for (auto& c : clients) {
    std::string r = c->read_contains("0\r\n\r\n");
    size_t count = 0;
    for (size_t p = r.find("data: x"); p != std::string::npos; p = r.find("data: x", p + 1)) ++count;
    EXPECT_EQ(count, 10u);
  }
  std::lock_guard<std::mutex> lock(mu);
  channels.clear();
}

}  // namespace
}  // namespace pdserve::api
