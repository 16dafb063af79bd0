// ApiService without a model: routing, API key, loading and draining states, metrics. Generation
// against the real engine is covered end to end in tests/e2e.
#include "api/service.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace pdserve::api {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// Runs everything inline and records what was answered.
class FakeChannel : public ResponseChannel {
 public:
  void respond(HttpResponse r) override {
    ++num_responses;
    response = std::move(r);
  }
  void start_stream(int status, std::string, HttpHeaders) override { stream_status = status; }
  void write(std::string data) override { streamed += data; }
  void end_stream() override { ended = true; }
  void on_close(std::function<void()> fn) override { close_fn = std::move(fn); }
  void post(std::function<void()> fn) override { fn(); }

  int num_responses = 0;
  HttpResponse response;
  int stream_status = 0;
  std::string streamed;
  bool ended = false;
  std::function<void()> close_fn;
};

HttpRequest request(std::string method, std::string path, std::string body = {}, std::string auth = {}) {
  HttpRequest r;
  r.method = std::move(method);
  r.target = path;
  r.path = std::move(path);
  r.body = std::move(body);
  r.authorization = std::move(auth);
  r.received = HttpClock::now();
  return r;
}

HttpResponse call(ApiService& s, HttpRequest r) {
  auto ch = std::make_shared<FakeChannel>();
  s.handle(std::move(r), ch);
  EXPECT_EQ(ch->num_responses, 1);
  return ch->response;
}

std::string header(const HttpResponse& r, std::string_view name) {
  for (const auto& [k, v] : r.headers) {
    if (k == name) return v;
  }
  return "";
}

TEST(ServiceTest, HealthIs503WhileLoading) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse r = call(s, request("GET", "/health"));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["status"], "loading");
}

TEST(ServiceTest, ModelRoutesAre503WhileLoading) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse r =
      call(s, request("POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"hi"}]})"));
  EXPECT_EQ(r.status, 503);
  EXPECT_THAT(r.body, HasSubstr("still loading"));
  EXPECT_EQ(header(r, "Retry-After"), "5");
  EXPECT_EQ(call(s, request("GET", "/v1/models")).status, 503);
  EXPECT_EQ(call(s, request("POST", "/tokenize", R"({"content":"x"})")).status, 503);
}

TEST(ServiceTest, MalformedBodiesAre400EvenWhileLoading) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse r = call(s, request("POST", "/v1/completions", "{not json"));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(json::parse(r.body)["error"]["message"].get<std::string>(), HasSubstr("not valid JSON"));
}

TEST(ServiceTest, UnknownModelIs400) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse r = call(s, request("POST", "/v1/completions", R"({"model":"gpt-9","prompt":"x"})"));
  EXPECT_EQ(r.status, 400);
  json e = json::parse(r.body)["error"];
  EXPECT_EQ(e["code"], "model_not_found");
  EXPECT_EQ(e["param"], "model");
  EXPECT_THAT(e["message"].get<std::string>(),
              HasSubstr("'gpt-9' does not exist; this server serves 'smol'"));
}

TEST(ServiceTest, RoutesAndMethods) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse nf = call(s, request("GET", "/v2/nothing"));
  EXPECT_EQ(nf.status, 404);
  EXPECT_THAT(nf.body, HasSubstr("no route GET /v2/nothing"));
  HttpResponse m = call(s, request("GET", "/v1/chat/completions"));
  EXPECT_EQ(m.status, 405);
  EXPECT_EQ(header(m, "Allow"), "POST");
  EXPECT_EQ(call(s, request("POST", "/health")).status, 405);
}

TEST(ServiceTest, ApiKeyOnEveryRouteButHealth) {
  ApiService s({.served_model_name = "smol", .api_key = "sekret"});
  EXPECT_EQ(call(s, request("GET", "/health")).status, 503);  // no key needed (loading)
  HttpResponse no = call(s, request("GET", "/metrics"));
  EXPECT_EQ(no.status, 401);
  EXPECT_EQ(json::parse(no.body)["error"]["code"], "invalid_api_key");
  EXPECT_EQ(header(no, "WWW-Authenticate"), "Bearer");
  EXPECT_EQ(call(s, request("GET", "/metrics", "", "Bearer wrong")).status, 401);
  EXPECT_EQ(call(s, request("GET", "/metrics", "", "Bearer sekre")).status, 401);
  EXPECT_EQ(call(s, request("POST", "/v1/completions", "{}", "sekret")).status, 401);
  EXPECT_EQ(call(s, request("GET", "/nothing")).status, 401);
  EXPECT_EQ(call(s, request("GET", "/metrics", "", "Bearer sekret")).status, 200);
  EXPECT_EQ(call(s, request("GET", "/metrics", "", "bearer sekret")).status, 200);
}

TEST(ServiceTest, DrainingHealth) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  s.set_draining();
  HttpResponse r = call(s, request("GET", "/health"));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["status"], "draining");
  HttpResponse g = call(s, request("POST", "/v1/completions", R"({"prompt":"x"})"));
  EXPECT_EQ(g.status, 503);
  EXPECT_THAT(g.body, HasSubstr("shutting down"));
}

TEST(ServiceTest, MetricsCountRequestsByEndpointAndStatus) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  call(s, request("GET", "/health"));
  call(s, request("GET", "/health"));
  call(s, request("GET", "/v1/bogus"));
  HttpResponse r = call(s, request("GET", "/metrics"));
  EXPECT_EQ(r.status, 200);
  EXPECT_THAT(r.content_type, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(r.body, HasSubstr("pdserve_http_requests_total{endpoint=\"/health\",status=\"503\"} 2\n"));
  EXPECT_THAT(r.body, HasSubstr("pdserve_http_requests_total{endpoint=\"other\",status=\"404\"} 1\n"));
  EXPECT_THAT(r.body, HasSubstr("# TYPE pdserve_time_to_first_token_seconds histogram\n"));
  EXPECT_THAT(r.body, HasSubstr("pdserve_model_loaded 0\n"));
  EXPECT_THAT(r.body, HasSubstr("pdserve_requests_in_flight 0\n"));
}

TEST(ServiceTest, ErrorResponseForServerErrors) {
  ApiService s({.served_model_name = "smol", .api_key = ""});
  HttpResponse r = s.error_response(413, "the request body is larger than 10 bytes");
  EXPECT_EQ(r.status, 413);
  json e = json::parse(r.body)["error"];
  EXPECT_EQ(e["code"], "request_too_large");
  EXPECT_EQ(e["type"], "invalid_request_error");
}

}  // namespace
}  // namespace pdserve::api
