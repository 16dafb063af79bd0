// Status and StatusOr: the one error type of pdserve (DESIGN.md §4).
//
// A Status is a code plus a human-readable message that names the problem and, where it helps,
// the fix. Functions that can fail on untrusted input or resources return Status or
// StatusOr<T>; programmer errors use PD_CHECK (common/check.h) instead. Value types, no
// thread-safety concerns beyond those of std::string.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/check.h"

namespace pdserve {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // the caller's input is wrong (bad file, bad request)
  kNotFound,            // a named thing does not exist
  kOutOfRange,          // a value is outside what is supported
  kResourceExhausted,   // memory, slots or blocks are used up; retry later
  kFailedPrecondition,  // the system is not in a state to do this
  kUnavailable,         // a peer or service cannot be reached or is loading
  kDeadlineExceeded,    // a time budget ran out
  kCancelled,           // the request was cancelled
  kUnimplemented,       // a feature or format we do not support
  kDataLoss,            // bytes are corrupt or truncated
  kUnauthenticated,     // credentials missing or wrong
  kInternal,            // a bug or an unexpected failure
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return {}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message"
  std::string to_string() const;
  // Returns a copy with "context: " put in front of the message.
  Status with_context(std::string_view context) const;
  // A short machine-readable word that says which case of the code this is, for a caller that acts
  // on it (e.g. a refusal for room rather than for a slot); empty unless set. It crosses the
  // internal API with the code and message, and with_context() keeps it.
  const std::string& reason() const { return reason_; }
  Status with_reason(std::string reason) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
  std::string reason_;
};

inline Status ok_status() { return {}; }
inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status failed_precondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status data_loss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status unauthenticated(std::string m) { return {StatusCode::kUnauthenticated, std::move(m)}; }

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(const Status& status) : v_(status) {  // NOLINT: implicit by design
    PD_CHECK_MSG(!status.ok(), "StatusOr constructed from an OK status without a value");
  }
  StatusOr(Status&& status) : v_(std::move(status)) {  // NOLINT
    PD_CHECK_MSG(!std::get<Status>(v_).ok(), "StatusOr constructed from an OK status without a value");
  }
  StatusOr(const T& value) : v_(value) {}        // NOLINT
  StatusOr(T&& value) : v_(std::move(value)) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status() : std::get<Status>(v_); }

  const T& value() const& {
    check_ok();
    return std::get<T>(v_);
  }
  T& value() & {
    check_ok();
    return std::get<T>(v_);
  }
  T&& value() && {
    check_ok();
    return std::get<T>(std::move(v_));
  }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

 private:
  void check_ok() const {
    if (!ok())
      pdserve::detail::check_failed(__FILE__, __LINE__, "StatusOr::value() on error",
                                    std::get<Status>(v_).to_string().c_str());
  }
  std::variant<Status, T> v_;
};

}  // namespace pdserve

#define PD_STATUS_CONCAT_INNER_(a, b) a##b
#define PD_STATUS_CONCAT_(a, b) PD_STATUS_CONCAT_INNER_(a, b)

// Returns the Status from the enclosing function if `expr` is not OK.
#define PD_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::pdserve::Status pd_status_ = (expr);   \
    if (!pd_status_.ok()) return pd_status_; \
  } while (0)

// `lhs = value of expr`, or returns its Status. lhs may declare a variable: auto x.
#define PD_ASSIGN_OR_RETURN(lhs, expr) \
  PD_ASSIGN_OR_RETURN_IMPL_(PD_STATUS_CONCAT_(pd_statusor_, __LINE__), lhs, expr)
#define PD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
