// API errors: what an HTTP client sees when a request fails — a status code and an OpenAI-style
// body {"error": {"message", "type", "param", "code"}} whose message names the problem.
// http_status_for() is the one place where a Status becomes an HTTP status (DESIGN.md §4).
// Value types; thread-safe as std::string is.
#pragma once

#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "common/check.h"
#include "common/status.h"

namespace pdserve::api {

struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type;   // "invalid_request_error", "authentication_error", "rate_limit_error", ...
  std::string param;  // the offending request field ("messages[1].content"); empty: null
  std::string code;   // a stable machine-readable code ("invalid_json", "model_not_found"); empty: null
  std::vector<std::pair<std::string, std::string>> headers;  // extra response headers (Retry-After)
};

// kInvalidArgument, kOutOfRange, kFailedPrecondition, kUnimplemented → 400; kUnauthenticated → 401;
// kNotFound → 404; kResourceExhausted → 429; kUnavailable, kCancelled → 503;
// kDeadlineExceeded → 504; everything else → 500.
int http_status_for(StatusCode code);

// The error type OpenAI uses for an HTTP status.
std::string error_type_for(int http_status);

// An ApiError from a Status (through http_status_for). 429 gets "Retry-After: 1".
ApiError api_error(const Status& status, std::string param = {}, std::string code = {});
// An error that is no Status: HTTP-level failures (404 route, 405 method, 413 body too large).
ApiError http_error(int http_status, std::string message, std::string code = {});

// {"error":{"message":...,"type":...,"param":...,"code":...}}
std::string error_body(const ApiError& error);

// A value or an ApiError.
template <typename T>
class ApiResult {
 public:
  ApiResult(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  ApiResult(ApiError error) : v_(std::move(error)) {}  // NOLINT
  bool ok() const { return std::holds_alternative<T>(v_); }
  const T& value() const& {
    PD_CHECK(ok());
    return std::get<T>(v_);
  }
  T& value() & {
    PD_CHECK(ok());
    return std::get<T>(v_);
  }
  const ApiError& error() const {
    PD_CHECK(!ok());
    return std::get<ApiError>(v_);
  }

 private:
  std::variant<T, ApiError> v_;
};

}  // namespace pdserve::api
