// ScenarioRouter: a gateway over several scenarios (DESIGN.md §1 item 1), each served by its own
// P/D group — a Router over that group's prefill and decode instances, with the scenario's TTFT
// budget. It labels each request with its scenario and hands it to that group's Router.
//
// Labelling (docs/decisions/cluster-config.md), the first rule that applies:
//   1. the X-PDServe-Scenario header — it must name a configured scenario, else the request fails
//      with 400 naming the ones there are; then the body's metadata.scenario when it names one
//      (another value is ignored: clients use metadata for their own purposes);
//   2. the request's "model", when a scenario lists it in `models`;
//   3. the system prompt (completions: the prompt text) starting with one of a scenario's
//      `system_prompt_prefixes` — the longest matching prefix wins, ties to the earlier scenario;
//   4. the default scenario.
//
// Thread-safety: all methods are thread-safe (the routers are, and the rules never change).
// Shut down as a Router: stop(), then the instances, then destroy.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "api/service.h"
#include "gateway/cluster_config.h"
#include "gateway/router.h"

namespace pdserve {

struct ScenarioGroup {
  ScenarioConfig config;
  std::unique_ptr<Router> router;  // over the group's instances, RouterOptions::scenario = config.name
};

class ScenarioRouter : public GenerationBackend {
 public:
  // groups: non-empty, unique names; default_scenario names one of them.
  ScenarioRouter(std::vector<ScenarioGroup> groups, const std::string& default_scenario);
  ~ScenarioRouter() override;  // stop()
  ScenarioRouter(const ScenarioRouter&) = delete;
  ScenarioRouter& operator=(const ScenarioRouter&) = delete;

  // The scenario of a request by the rules above, or kInvalidArgument for the client.
  StatusOr<std::string> label(const api::ScenarioHints& hints) const;
  // Every model name the scenarios select (for the API's accepted "model" values).
  std::vector<std::string> model_names() const;
  void stop();

  // The smallest over the groups: a request may land in any.
  int32_t max_context() const override;
  int64_t max_sequence_tokens() const override;
  // EngineRequest::scenario picks the group (empty: the default); an unknown one is kInvalidArgument.
  Status validate(const EngineRequest& request) const override;
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override;
  using GenerationBackend::submit;
  EngineMetrics metrics() const override;

 private:
  StatusOr<Router*> group_of(const std::string& scenario) const;
  std::string names() const;  // "a, b, c" for errors

  std::vector<ScenarioGroup> groups_;
  size_t default_idx_ = 0;
};

}  // namespace pdserve
