#include "gateway/scenario_router.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/check.h"

namespace pdserve {

ScenarioRouter::ScenarioRouter(std::vector<ScenarioGroup> groups, const std::string& default_scenario)
    : groups_(std::move(groups)) {
  PD_CHECK(!groups_.empty());
  bool found = false;
  for (size_t i = 0; i < groups_.size(); ++i) {
    PD_CHECK(groups_[i].router != nullptr);
    if (groups_[i].config.name == default_scenario) {
      default_idx_ = i;
      found = true;
    }
  }
  PD_CHECK(found);
}

ScenarioRouter::~ScenarioRouter() { stop(); }

void ScenarioRouter::stop() {
  for (ScenarioGroup& g : groups_) g.router->stop();
}

std::string ScenarioRouter::names() const {
  std::string s;
  for (const ScenarioGroup& g : groups_) s += (s.empty() ? "" : ", ") + g.config.name;
  return s;
}

StatusOr<std::string> ScenarioRouter::label(const api::ScenarioHints& hints) const {
  if (!hints.header.empty()) {
    for (const ScenarioGroup& g : groups_) {
      if (g.config.name == hints.header) return hints.header;
    }
    return invalid_argument(
        fmt::format("the X-PDServe-Scenario header names the scenario '{}', which this gateway "
                    "does not serve; its scenarios are: {}",
                    hints.header, names()));
  }
  // NOTE: "metadata" is OpenAI's free-form field, which clients also fill for their own purposes
  // (pdserve bench names its workload's scenarios there): a value that names no scenario of this
  // gateway is ignored, not refused.
  for (const ScenarioGroup& g : groups_) {
    if (!hints.metadata.empty() && g.config.name == hints.metadata) return hints.metadata;
  }
  if (!hints.model.empty()) {
    for (const ScenarioGroup& g : groups_) {
      if (std::find(g.config.models.begin(), g.config.models.end(), hints.model) != g.config.models.end()) {
        return g.config.name;
      }
    }
  }
  const ScenarioGroup* best = nullptr;
  size_t best_len = 0;
  for (const ScenarioGroup& g : groups_) {
    for (const std::string& prefix : g.config.system_prompt_prefixes) {
      if (prefix.size() > best_len && hints.system_prompt.starts_with(prefix)) {
        best = &g;
        best_len = prefix.size();
      }
    }
  }
  return best ? best->config.name : groups_[default_idx_].config.name;
}

std::vector<std::string> ScenarioRouter::model_names() const {
  std::vector<std::string> out;
  for (const ScenarioGroup& g : groups_)
    out.insert(out.end(), g.config.models.begin(), g.config.models.end());
  return out;
}

StatusOr<Router*> ScenarioRouter::group_of(const std::string& scenario) const {
  if (scenario.empty()) return groups_[default_idx_].router.get();
  for (const ScenarioGroup& g : groups_) {
    if (g.config.name == scenario) return g.router.get();
  }
  return invalid_argument(
      fmt::format("unknown scenario '{}'; this gateway's scenarios are: {}", scenario, names()));
}

int32_t ScenarioRouter::max_context() const {
  int32_t m = groups_[0].router->max_context();
  for (const ScenarioGroup& g : groups_) m = std::min(m, g.router->max_context());
  return m;
}

int64_t ScenarioRouter::max_sequence_tokens() const {
  int64_t m = groups_[0].router->max_sequence_tokens();
  for (const ScenarioGroup& g : groups_) m = std::min(m, g.router->max_sequence_tokens());
  return m;
}

Status ScenarioRouter::validate(const EngineRequest& request) const {
  PD_ASSIGN_OR_RETURN(Router * r, group_of(request.scenario));
  return r->validate(request);
}

StatusOr<std::shared_ptr<RequestHandle>> ScenarioRouter::submit(EngineRequest request, OutputSink sink,
                                                                std::shared_ptr<RequestHandle> handle) {
  PD_ASSIGN_OR_RETURN(Router * r, group_of(request.scenario));
  return r->submit(std::move(request), std::move(sink), std::move(handle));
}

EngineMetrics ScenarioRouter::metrics() const {
  EngineMetrics m;
  for (const ScenarioGroup& g : groups_) add_metrics(m, g.router->metrics());
  return m;
}

}  // namespace pdserve
