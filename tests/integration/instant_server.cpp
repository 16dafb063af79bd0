// pdserve_instant_server: a tiny OpenAI-compatible server that answers at once — a test fixture
// for `pdserve bench` (its integration test and the measurement of its own overhead in
// docs/perf/bench.md), not a product feature.
//
// Every completion (POST /v1/completions, /v1/chat/completions) streams max_tokens tokens (or
// --tokens when the request has none), each its own SSE event "data: {...}", then a usage event
// when stream_options.include_usage is set, then "data: [DONE]". Optional delays make the first
// token and every later one arrive after --ttft-ms / --itl-ms. Prompt tokens are counted as
// whitespace-separated words, and POST /tokenize counts the same way. Also GET /v1/models,
// /health and /metrics (Prometheus text: instant_requests_total, instant_generated_tokens_total).
// Prints "listening on HOST:PORT" on stdout once it accepts connections.
#include <fmt/format.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <csignal>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>

namespace {
namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using nlohmann::json;

struct Options {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  int threads = 1;
  int64_t tokens = 16;
  double ttft_ms = 0;
  double itl_ms = 0;
  int64_t fail_every = 0;
  std::string api_key;
};

std::atomic<int64_t> g_requests{0};
std::atomic<int64_t> g_tokens{0};

int64_t count_words(const std::string& s) {
  int64_t n = 0;
  bool in_word = false;
  for (char c : s) {
    bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    if (!space && !in_word) ++n;
    in_word = !space;
  }
  return n;
}

std::string chunk(const std::string& data) { return fmt::format("{:x}\r\n{}\r\n", data.size(), data); }
std::string sse(const std::string& data) { return chunk("data: " + data + "\n\n"); }

std::string plain_response(int status, const std::string& content_type, const std::string& body,
                           bool keep_alive) {
  return fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{}",
                     status, status == 200 ? "OK" : "Error", content_type, body.size(),
                     keep_alive ? "keep-alive" : "close", body);
}

std::string error_body(const std::string& message, const std::string& type) {
  return json{{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}}}}
      .dump();
}

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, const Options& o)
      : socket_(std::move(socket)), timer_(socket_.get_executor()), o_(o) {}

  void read() {
    parser_.emplace();
    parser_->body_limit(64u << 20);
    http::async_read(socket_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return;
      self->handle(self->parser_->release());
    });
  }

 private:
  void handle(http::request<http::string_body> req) {
    keep_alive_ = req.keep_alive();
    std::string target(req.target());
    if (!o_.api_key.empty() && target != "/health" &&
        std::string(req[http::field::authorization]) != "Bearer " + o_.api_key) {
      return send(plain_response(401, "application/json", error_body("bad API key", "authentication_error"),
                                 keep_alive_),
                  true);
    }
    if (target == "/health")
      return send(plain_response(200, "application/json", R"({"status":"ok"})", keep_alive_), true);
    if (target == "/v1/models") {
      return send(
          plain_response(200, "application/json",
                         R"({"object":"list","data":[{"id":"instant","object":"model"}]})", keep_alive_),
          true);
    }
    if (target == "/metrics") {
      std::string body = fmt::format(
          "# TYPE instant_requests_total counter\ninstant_requests_total {}\n"
          "# TYPE instant_generated_tokens_total counter\ninstant_generated_tokens_total {}\n",
          g_requests.load(), g_tokens.load());
      return send(plain_response(200, "text/plain; version=0.0.4", body, keep_alive_), true);
    }
    json body = json::parse(req.body(), nullptr, false);
    if (target == "/tokenize") {
      if (!body.is_object() || !body.contains("content") || !body["content"].is_string()) {
        return send(
            plain_response(400, "application/json",
                           error_body("expected {\"content\": text}", "invalid_request_error"), keep_alive_),
            true);
      }
      int64_t n = count_words(body["content"].get<std::string>());
      json tokens = json::array();
      for (int64_t i = 0; i < n; ++i) tokens.push_back(i);
      return send(
          plain_response(200, "application/json", json{{"tokens", tokens}, {"count", n}}.dump(), keep_alive_),
          true);
    }
    bool chat = target == "/v1/chat/completions";
    if (!chat && target != "/v1/completions") {
      return send(plain_response(404, "application/json", error_body("no route " + target, "not_found_error"),
                                 keep_alive_),
                  true);
    }
    if (!body.is_object()) {
      return send(plain_response(400, "application/json",
                                 error_body("malformed JSON", "invalid_request_error"), keep_alive_),
                  true);
    }
    int64_t seq = g_requests.fetch_add(1) + 1;
    if (o_.fail_every > 0 && seq % o_.fail_every == 0) {
      return send(plain_response(500, "application/json", error_body("injected failure", "server_error"),
                                 keep_alive_),
                  true);
    }
    chat_ = chat;
    tokens_ = o_.tokens;
    if (body.contains("max_tokens") && body["max_tokens"].is_number_integer())
      tokens_ = body["max_tokens"].get<int64_t>();
    if (body.contains("max_completion_tokens") && body["max_completion_tokens"].is_number_integer()) {
      tokens_ = body["max_completion_tokens"].get<int64_t>();
    }
    prompt_tokens_ = 0;
    if (chat && body.contains("messages") && body["messages"].is_array()) {
      for (const auto& m : body["messages"]) {
        if (m.is_object() && m.contains("content") && m["content"].is_string()) {
          prompt_tokens_ += count_words(m["content"].get<std::string>());
        }
      }
    } else if (body.contains("prompt") && body["prompt"].is_string()) {
      prompt_tokens_ = count_words(body["prompt"].get<std::string>());
    }
    include_usage_ = body.contains("stream_options") && body["stream_options"].is_object() &&
                     body["stream_options"].value("include_usage", false);
    g_tokens.fetch_add(tokens_);
    json usage = {{"prompt_tokens", prompt_tokens_},
                  {"completion_tokens", tokens_},
                  {"total_tokens", prompt_tokens_ + tokens_}};
    if (!body.value("stream", false)) {
      std::string text;
      for (int64_t i = 0; i < tokens_; ++i) text += " tok";
      json choice = chat ? json{{"index", 0},
                                {"message", {{"role", "assistant"}, {"content", text}}},
                                {"finish_reason", "length"}}
                         : json{{"index", 0}, {"text", text}, {"finish_reason", "length"}};
      json r = {{"id", "x"},
                {"object", chat ? "chat.completion" : "text_completion"},
                {"model", "instant"},
                {"choices", {choice}},
                {"usage", usage}};
      return send(plain_response(200, "application/json", r.dump(), keep_alive_), true);
    }
    usage_ = usage.dump();
    next_token_ = 0;
    std::string head = fmt::format(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: "
        "{}\r\n\r\n",
        keep_alive_ ? "keep-alive" : "close");
    if (o_.ttft_ms <= 0 && o_.itl_ms <= 0) {
      // Everything in one write.
      std::string all = head;
      while (next_token_ < tokens_) all += token_event();
      all += tail();
      return send(std::move(all), true);
    }
    pending_ = std::move(head);
    wait_then_stream(o_.ttft_ms);
  }

  std::string token_event() {
    ++next_token_;
    if (chat_) {
      return sse(fmt::format(
          R"({{"id":"x","object":"chat.completion.chunk","model":"instant","choices":[{{"index":0,"delta":{{"content":" tok"}},"finish_reason":null}}]}})"));
    }
    return sse(
        R"({"id":"x","object":"text_completion","model":"instant","choices":[{"index":0,"text":" tok","finish_reason":null}]})");
  }

  std::string tail() {
    std::string s;
    if (include_usage_) {
      s += sse(fmt::format(R"({{"id":"x","object":"{}","model":"instant","choices":[],"usage":{}}})",
                           chat_ ? "chat.completion.chunk" : "text_completion", usage_));
    }
    s += sse("[DONE]");
    s += "0\r\n\r\n";
    return s;
  }

  void wait_then_stream(double ms) {
    timer_.expires_after(std::chrono::microseconds(static_cast<int64_t>(ms * 1000)));
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;
      std::string out = std::move(self->pending_);
      self->pending_.clear();
      bool last = self->next_token_ >= self->tokens_ - 1;
      if (self->tokens_ > 0) out += self->token_event();
      if (last) out += self->tail();
      self->send(std::move(out), last);
    });
  }

  void send(std::string bytes, bool last) {
    out_ = std::move(bytes);
    net::async_write(socket_, net::buffer(out_),
                     [self = shared_from_this(), last](beast::error_code ec, size_t) {
                       if (ec) return;
                       if (!last) return self->wait_then_stream(self->o_.itl_ms);
                       if (self->keep_alive_) return self->read();
                       beast::error_code ignored;
                       self->socket_.shutdown(tcp::socket::shutdown_send, ignored);
                     });
  }

  tcp::socket socket_;
  net::steady_timer timer_;
  const Options& o_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string out_, pending_, usage_;
  bool keep_alive_ = true, chat_ = false, include_usage_ = false;
  int64_t tokens_ = 0, next_token_ = 0, prompt_tokens_ = 0;
};

void accept(tcp::acceptor& acceptor, const Options& o) {
  acceptor.async_accept(net::make_strand(acceptor.get_executor()),
                        [&acceptor, &o](beast::error_code ec, tcp::socket s) {
                          if (!ec) {
                            s.set_option(tcp::no_delay(true), ec);
                            std::make_shared<Connection>(std::move(s), o)->read();
                          }
                          accept(acceptor, o);
                        });
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "pdserve_instant_server: an OpenAI-compatible server that answers at once (a test fixture for pdserve "
      "bench)"};
  app.option_defaults()->always_capture_default();
  app.add_option("--host", o.host, "Address to listen on");
  app.add_option("--port", o.port, "Port (0: a free one; the chosen port is printed)");
  app.add_option("--threads", o.threads, "Event-loop threads")->check(CLI::Range(1, 256));
  app.add_option("--tokens", o.tokens, "Tokens per answer when the request has no max_tokens");
  app.add_option("--ttft-ms", o.ttft_ms, "Delay before the first token");
  app.add_option("--itl-ms", o.itl_ms, "Delay between later tokens");
  app.add_option("--fail-every", o.fail_every, "Answer every K-th completion with HTTP 500 (0: never)");
  app.add_option("--api-key", o.api_key, "Require 'Authorization: Bearer KEY' (except /health)");
  CLI11_PARSE(app, argc, argv);
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }

  net::io_context ioc(o.threads);
  tcp::acceptor acceptor(ioc);
  tcp::endpoint ep(net::ip::make_address(o.host), o.port);
  acceptor.open(ep.protocol());
  acceptor.set_option(net::socket_base::reuse_address(true));
  acceptor.bind(ep);
  acceptor.listen(4096);
  accept(acceptor, o);
  net::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&](beast::error_code, int) { ioc.stop(); });
  std::printf("listening on %s:%u\n", o.host.c_str(),
              static_cast<unsigned>(acceptor.local_endpoint().port()));
  std::fflush(stdout);
  std::vector<std::thread> threads;
  for (int i = 1; i < o.threads; ++i) threads.emplace_back([&ioc] { ioc.run(); });
  ioc.run();
  for (auto& t : threads) t.join();
  return 0;
}
