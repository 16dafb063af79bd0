#include "common/status.h"

#include <cstdio>
#include <cstdlib>

namespace pdserve {

std::string_view status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kOutOfRange: return "OUT_OF_RANGE";
    case StatusCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kCancelled: return "CANCELLED";
    case StatusCode::kUnimplemented: return "UNIMPLEMENTED";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kUnauthenticated: return "UNAUTHENTICATED";
    case StatusCode::kInternal: return "INTERNAL";
  }
  return "UNKNOWN";
}

std::string Status::to_string() const {
  if (ok()) return "OK";
  std::string out(status_code_name(code_));
  out += ": ";
  out += message_;
  return out;
}

Status Status::with_context(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  m += ": ";
  m += message_;
  Status st(code_, std::move(m));
  st.reason_ = reason_;
  return st;
}

Status Status::with_reason(std::string reason) const {
  Status st = *this;
  if (!ok()) st.reason_ = std::move(reason);
  return st;
}

namespace detail {
void check_failed(const char* file, int line, const char* condition, const char* message) {
  std::fprintf(stderr, "pdserve: CHECK failed at %s:%d: %s%s%s\n", file, line, condition,
               message ? " — " : "", message ? message : "");
  std::fflush(stderr);
  std::abort();
}
}  // namespace detail

}  // namespace pdserve
