#include "api/instance_service.h"

#include <fmt/format.h>

#include <atomic>
#include <optional>

#include "api/internal_protocol.h"
#include "api/protocol.h"
#include "common/log.h"

namespace pdserve::api {

namespace {

constexpr std::string_view kEventStream = "text/event-stream";

HttpResponse status_response(const Status& st) {
  HttpResponse r;
  r.status = http_status_for(st.code());
  r.body = encode_status(st);
  if (r.status == 429) r.headers.emplace_back("Retry-After", "0");
  return r;
}

std::string event_frame(const StreamEvent& e) { return "data: " + encode_stream_event(e) + "\n\n"; }

// Streams one request's events to its connection; the request is cancelled if the peer goes away.
// A handoff that reaches a connection already closed is released here: nobody else knows of it.
OutputSink stream_sink(Engine& engine, const std::shared_ptr<ResponseChannel>& channel,
                       const std::shared_ptr<std::atomic<bool>>& closed) {
  return [&engine, channel, closed](EngineOutput&& out) {
    const bool last = out.finished;
    std::optional<KvBufferRef> staged;
    if (out.handoff) staged = out.handoff->kv.ref();
    std::string frame = event_frame(StreamEvent(std::move(out)));
    channel->post([&engine, channel, closed, staged, frame = std::move(frame), last]() mutable {
      if (closed->load() && staged) {
        (void)engine.release_handoff(*staged);
        return;
      }
      channel->write(std::move(frame));
      if (last) channel->end_stream();
    });
  };
}

// on_close: cancel the request and remember that its connection is gone.
std::function<void()> on_gone(const std::shared_ptr<RequestHandle>& handle,
                              const std::shared_ptr<std::atomic<bool>>& closed) {
  return [handle, closed] {
    closed->store(true);
    handle->cancel();
  };
}

}  // namespace

InstanceService::InstanceService(Engine& engine, std::string transport, std::string token)
    : engine_(engine), transport_(std::move(transport)), token_(std::move(token)) {}

void InstanceService::handle(HttpRequest request, std::shared_ptr<ResponseChannel> channel) {
  const std::string& path = request.path;
  const bool post = request.method == "POST";
  if (path == "/health" && request.method == "GET") {
    channel->respond({200, "application/json", R"({"status":"ok"})", {}});
  } else if (!token_.empty() && !bearer_matches(request.authorization, token_)) {
    HttpResponse r = status_response(unauthenticated(
        "missing or wrong internal token: send \"Authorization: Bearer TOKEN\" with this instance's "
        "--internal-token"));
    r.headers.emplace_back("WWW-Authenticate", "Bearer");
    channel->respond(std::move(r));
  } else if (path == "/internal/v1/stats" && request.method == "GET") {
    handle_stats(*channel);
  } else if (path == "/internal/v1/submit" && post) {
    handle_submit(request, channel);
  } else if (path == "/internal/v1/handoff" && post) {
    handle_handoff(request, channel);
  } else if (path == "/internal/v1/release" && post) {
    handle_release(request, *channel);
  } else {
    channel->respond(status_response(not_found(fmt::format("no route {} {}", request.method, path))));
  }
}

void InstanceService::handle_submit(const HttpRequest& request,
                                    const std::shared_ptr<ResponseChannel>& channel) {
  StatusOr<EngineRequest> r = decode_engine_request(request.body);
  if (!r.ok()) return channel->respond(status_response(r.status()));
  auto closed = std::make_shared<std::atomic<bool>>(false);
  auto handle = engine_.submit(std::move(*r), stream_sink(engine_, channel, closed), nullptr);
  if (!handle.ok()) return channel->respond(status_response(handle.status()));
  channel->start_stream(200, std::string(kEventStream));
  channel->on_close(on_gone(*handle, closed));
}

void InstanceService::handle_handoff(const HttpRequest& request,
                                     const std::shared_ptr<ResponseChannel>& channel) {
  auto r = decode_handoff_request(request.body);
  if (!r.ok()) return channel->respond(status_response(r.status()));
  auto on_pulled = [channel](const Status& st) {
    std::string frame = event_frame(StreamEvent(PulledEvent{st}));
    channel->post([channel, frame = std::move(frame)]() mutable { channel->write(std::move(frame)); });
  };
  auto closed = std::make_shared<std::atomic<bool>>(false);
  auto handle = engine_.submit_handoff(std::move(r->first), r->second, stream_sink(engine_, channel, closed),
                                       std::move(on_pulled), nullptr);
  if (!handle.ok()) return channel->respond(status_response(handle.status()));
  channel->start_stream(200, std::string(kEventStream));
  channel->on_close(on_gone(*handle, closed));
}

void InstanceService::handle_release(const HttpRequest& request, ResponseChannel& channel) {
  StatusOr<KvBufferRef> kv = decode_release(request.body);
  if (!kv.ok()) return channel.respond(status_response(kv.status()));
  if (Status st = engine_.release_handoff(*kv); !st.ok()) return channel.respond(status_response(st));
  channel.respond({200, "application/json", "{}", {}});
}

void InstanceService::handle_stats(ResponseChannel& channel) {
  InstanceStats s;
  s.role = engine_.role();
  s.max_context = engine_.max_context();
  s.max_sequence_tokens = engine_.max_sequence_tokens();
  s.model_fingerprint = engine_.model_fingerprint();
  s.transport = transport_;
  s.kv_dtype = std::string(kv_dtype_name(engine_.kv_dtype()));
  s.features = instance_features();
  s.metrics = engine_.metrics();
  channel.respond({200, "application/json", encode_instance_stats(s), {}});
}

}  // namespace pdserve::api
