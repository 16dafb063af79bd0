// InstanceService: the internal API (internal_protocol.h) of one instance process — routes of
// `pdserve instance` over its Engine. A gateway submits requests (try-accept: 429 at once when
// full), hands requests to decodes, releases prefill slots and reads stats; each accepted request
// answers with a stream of events, and a closed connection cancels it.
// Thread-safety: handle() runs on the HTTP server's I/O threads; engine outputs are posted to the
// connection's strand.
#pragma once

#include <memory>
#include <string>

#include "api/http_server.h"
#include "engine/engine.h"

namespace pdserve::api {

class InstanceService {
 public:
  // `engine` must outlive the service. `transport` names the KV transport ("shm", "tcp", ...).
  // `token`: when not empty, every route but /health requires "Authorization: Bearer TOKEN"
  // (401 otherwise).
  InstanceService(Engine& engine, std::string transport, std::string token = {});

  void handle(HttpRequest request, std::shared_ptr<ResponseChannel> channel);

 private:
  void handle_submit(const HttpRequest& request, const std::shared_ptr<ResponseChannel>& channel);
  void handle_handoff(const HttpRequest& request, const std::shared_ptr<ResponseChannel>& channel);
  void handle_release(const HttpRequest& request, ResponseChannel& channel);
  void handle_stats(ResponseChannel& channel);

  Engine& engine_;
  std::string transport_;
  std::string token_;
};

}  // namespace pdserve::api
