#include "gateway/cluster_config.h"

#include <fmt/format.h>

#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "common/toml.h"

namespace pdserve {

namespace {

// Reads one table: typed getters that remember which keys were read, then unknown_keys() names
// the first key nobody read (a typo in the file is an error, not silently ignored).
class TableReader {
 public:
  TableReader(const TomlValue& table, std::string path, std::string_view source)
      : table_(table), path_(std::move(path)), source_(source) {}

  Status error_at(const TomlValue& n, std::string_view key, std::string_view message) const {
    return invalid_argument(fmt::format("{}:{}:{}: {}{}: {}", source_, n.line, n.column,
                                        path_.empty() ? "" : path_ + ".", key, message));
  }

  // OK when `n` has the type, else "KEY: must be a string, not an integer".
  Status expect(const TomlValue& n, std::string_view key, TomlValue::Type type) const {
    if (n.type == type) return ok_status();
    TomlValue want;
    want.type = type;
    return error_at(n, key, fmt::format("must be {}, not {}", want.type_name(), n.type_name()));
  }

  const TomlValue* get(std::string_view key) {
    seen_.insert(std::string(key));
    return table_.find(key);
  }

  Status string(std::string_view key, std::string* out) {
    const TomlValue* n = get(key);
    if (!n) return ok_status();
    PD_RETURN_IF_ERROR(expect(*n, key, TomlValue::Type::kString));
    *out = n->string;
    return ok_status();
  }

  Status integer(std::string_view key, int64_t lo, int64_t hi, int64_t* out) {
    const TomlValue* n = get(key);
    if (!n) return ok_status();
    PD_RETURN_IF_ERROR(expect(*n, key, TomlValue::Type::kInteger));
    const int64_t v = n->integer;
    if (v < lo || v > hi) return error_at(*n, key, fmt::format("must be in [{}, {}], not {}", lo, hi, v));
    *out = v;
    return ok_status();
  }

  Status integer(std::string_view key, int64_t lo, int64_t hi, int* out) {
    int64_t v = *out;
    PD_RETURN_IF_ERROR(integer(key, lo, hi, &v));
    *out = static_cast<int>(v);
    return ok_status();
  }

  Status number(std::string_view key, double lo, double hi, double* out) {
    const TomlValue* n = get(key);
    if (!n) return ok_status();
    double v = 0;
    if ((n->type == TomlValue::Type::kInteger)) {
      v = static_cast<double>(n->integer);
    } else if ((n->type == TomlValue::Type::kFloat)) {
      v = n->number;
    } else {
      return error_at(*n, key, fmt::format("must be a number, not {}", n->type_name()));
    }
    if (!(v >= lo && v <= hi))
      return error_at(*n, key, fmt::format("must be in [{}, {}], not {}", lo, hi, v));
    *out = v;
    return ok_status();
  }

  Status strings(std::string_view key, std::vector<std::string>* out) {
    const TomlValue* n = get(key);
    if (!n) return ok_status();
    if (n->type != TomlValue::Type::kArray) {
      return error_at(*n, key, fmt::format("must be an array of strings, not {}", n->type_name()));
    }
    for (const TomlValue& e : n->array) {
      if (!(e.type == TomlValue::Type::kString)) {
        return error_at(e, key, fmt::format("must be an array of strings; it holds {}", e.type_name()));
      }
      if (e.string.empty()) return error_at(e, key, "holds an empty string");
      out->push_back(e.string);
    }
    return ok_status();
  }

  Status unknown_keys(std::string_view what_is_allowed) const {
    for (const auto& [k, v] : table_.table) {
      if (!seen_.contains(std::string(k))) {
        return error_at(v, k, fmt::format("unknown key (allowed here: {})", what_is_allowed));
      }
    }
    return ok_status();
  }

  const std::string& path() const { return path_; }

 private:
  const TomlValue& table_;
  std::string path_;
  std::string_view source_;
  std::set<std::string> seen_;
};

bool valid_name(std::string_view s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

// The `pdserve instance` engine settings a file may give, with their value types.
enum class FlagType { kInteger, kString, kBoolean };
const std::map<std::string, FlagType, std::less<>>& engine_keys() {
  static const std::map<std::string, FlagType, std::less<>> keys = {
      {"threads", FlagType::kInteger},
      {"kv_cache_memory", FlagType::kString},
      {"block_size", FlagType::kInteger},
      {"max_running", FlagType::kInteger},
      {"max_waiting", FlagType::kInteger},
      {"step_token_budget", FlagType::kInteger},
      {"max_context", FlagType::kInteger},
      {"no_prefix_caching", FlagType::kBoolean},
      {"prefill_slots", FlagType::kInteger},
      {"decode_pending", FlagType::kInteger},
      {"handoff_lease_ms", FlagType::kInteger},
      {"http_threads", FlagType::kInteger},
      {"kv_listen", FlagType::kString},
      {"device", FlagType::kString},
      {"dtype", FlagType::kString},
      {"kv_send_memory", FlagType::kString},
      {"kv_layer_wise", FlagType::kBoolean},
      {"deadline_priority_ms", FlagType::kInteger},
  };
  return keys;
}

std::string engine_key_list() {
  std::string s;
  for (const auto& [k, t] : engine_keys()) s += (s.empty() ? "" : ", ") + k;
  return s;
}

// Reads the engine settings of `r`'s table into flags (replacing earlier values of a key).
Status read_engine_flags(TableReader& r, const TomlValue& t,
                         std::vector<std::pair<std::string, std::string>>* flags) {
  for (const auto& [k, v] : t.table) {
    auto it = engine_keys().find(k);
    if (it == engine_keys().end()) continue;  // another key of the table, or unknown (checked later)
    r.get(k);
    std::string flag = "--" + std::string(k);
    for (char& c : flag) c = c == '_' ? '-' : c;
    std::string value;
    switch (it->second) {
      case FlagType::kInteger:
        PD_RETURN_IF_ERROR(r.expect(v, k, TomlValue::Type::kInteger));
        value = std::to_string(v.integer);
        break;
      case FlagType::kString:
        PD_RETURN_IF_ERROR(r.expect(v, k, TomlValue::Type::kString));
        if (v.string.empty()) return r.error_at(v, k, "is empty");
        value = v.string;
        break;
      case FlagType::kBoolean: PD_RETURN_IF_ERROR(r.expect(v, k, TomlValue::Type::kBoolean)); break;
    }
    std::erase_if(*flags, [&](const auto& f) { return f.first == flag; });
    if (it->second == FlagType::kBoolean && !v.boolean) continue;
    flags->emplace_back(std::move(flag), std::move(value));
  }
  return ok_status();
}

// The array of tables `key` ([[key]]), or an error when the key holds something else.
StatusOr<const TomlValue*> table_array(TableReader& r, std::string_view key) {
  const TomlValue* n = r.get(key);
  if (!n) return n;
  if (n->type != TomlValue::Type::kArray || !n->is_table_array) {
    return r.error_at(
        *n, key, fmt::format("must be an array of tables ([[{}]] sections), not {}", key, n->type_name()));
  }
  return n;
}

Status parse_scenario(const TomlValue& t, size_t idx, std::string_view source, ScenarioConfig* s) {
  TableReader r(t, fmt::format("scenario[{}]", idx), source);
  s->line = t.line;
  PD_RETURN_IF_ERROR(r.string("name", &s->name));
  if (!valid_name(s->name)) {
    const TomlValue* n = t.find("name");
    return n ? r.error_at(*n, "name", "must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
             : invalid_argument(fmt::format("{}: {}: a scenario needs a name", source, r.path()));
  }
  PD_RETURN_IF_ERROR(r.strings("models", &s->models));
  PD_RETURN_IF_ERROR(r.strings("system_prompt_prefixes", &s->system_prompt_prefixes));
  PD_RETURN_IF_ERROR(r.integer("ttft_budget_ms", 1, 3'600'000, &s->ttft_budget_ms));
  PD_RETURN_IF_ERROR(r.number("ttft_budget_ms_per_token", 0, 1000, &s->ttft_budget_ms_per_token));
  PD_RETURN_IF_ERROR(r.integer("decode_wait_ms", 1, 3'600'000, &s->decode_wait_ms));
  return r.unknown_keys(
      "name, models, system_prompt_prefixes, ttft_budget_ms, ttft_budget_ms_per_token, decode_wait_ms");
}

Status parse_instance(const TomlValue& t, size_t idx, std::string_view source,
                      const std::vector<std::pair<std::string, std::string>>& defaults,
                      InstanceConfig* inst) {
  TableReader r(t, fmt::format("instance[{}]", idx), source);
  inst->line = t.line;
  PD_RETURN_IF_ERROR(r.string("name", &inst->name));
  if (!inst->name.empty() && !valid_name(inst->name)) {
    return r.error_at(*t.find("name"), "name", "must be 1 to 64 characters of A-Z a-z 0-9 _ . -");
  }
  PD_RETURN_IF_ERROR(r.string("scenario", &inst->scenario));
  PD_RETURN_IF_ERROR(r.string("role", &inst->role));
  if (inst->role != "prefill" && inst->role != "decode") {
    const TomlValue* n = t.find("role");
    return n ? r.error_at(*n, "role",
                          fmt::format("must be \"prefill\" or \"decode\", not \"{}\"", inst->role))
             : invalid_argument(
                   fmt::format("{}: {}: role is required (\"prefill\" or \"decode\")", source, r.path()));
  }
  PD_RETURN_IF_ERROR(r.string("host", &inst->host));
  if (inst->host.empty()) return r.error_at(*t.find("host"), "host", "is empty");
  if (!t.find("port")) {
    return invalid_argument(fmt::format(
        "{}: {}: port is required (where the instance's internal API listens)", source, r.path()));
  }
  PD_RETURN_IF_ERROR(r.integer("port", 1, 65535, &inst->port));
  inst->flags = defaults;
  PD_RETURN_IF_ERROR(read_engine_flags(r, t, &inst->flags));
  return r.unknown_keys("name, scenario, role, host, port, " + engine_key_list());
}

Status parse_gateway(const TomlValue& t, std::string_view source, GatewayConfig* g) {
  TableReader r(t, "gateway", source);
  PD_RETURN_IF_ERROR(r.string("host", &g->host));
  PD_RETURN_IF_ERROR(r.integer("port", 0, 65535, &g->port));
  PD_RETURN_IF_ERROR(r.integer("http_threads", 1, 256, &g->http_threads));
  PD_RETURN_IF_ERROR(r.integer("stream_threads", 1, 256, &g->stream_threads));
  PD_RETURN_IF_ERROR(r.string("admission", &g->admission));
  if (g->admission != "on-demand" && g->admission != "baseline") {
    return r.error_at(*t.find("admission"), "admission",
                      fmt::format("must be \"on-demand\" or \"baseline\", not \"{}\"", g->admission));
  }
  PD_RETURN_IF_ERROR(r.string("default_scenario", &g->default_scenario));
  PD_RETURN_IF_ERROR(r.integer("connect_timeout_s", 0, 3600, &g->connect_timeout_s));
  PD_RETURN_IF_ERROR(r.string("served_model_name", &g->served_model_name));
  return r.unknown_keys(
      "host, port, http_threads, stream_threads, admission, default_scenario, connect_timeout_s, "
      "served_model_name");
}

// Cross-checks: unique names and addresses, every instance in a known scenario, every scenario
// with both roles, labelling rules that select one scenario each.
Status check(ClusterConfig& c, std::string_view source) {
  // "FILE:LINE" of a table, or "FILE" for one not from the file.
  auto at = [source](int line) {
    return line > 0 ? fmt::format("{}:{}", source, line) : std::string(source);
  };
  std::map<std::string, int> scenario_line;
  std::map<std::string, std::string> model_owner, prefix_owner;
  for (const ScenarioConfig& s : c.scenarios) {
    if (auto [it, fresh] = scenario_line.emplace(s.name, s.line); !fresh) {
      return invalid_argument(fmt::format("{}: a second scenario named \"{}\" (the first is at line {})",
                                          at(s.line), s.name, it->second));
    }
    for (const auto& [list, what, owner] :
         {std::tuple{&s.models, "model name", &model_owner},
          std::tuple{&s.system_prompt_prefixes, "system prompt prefix", &prefix_owner}}) {
      for (const std::string& m : *list) {
        auto [it, fresh] = owner->emplace(m, s.name);
        if (fresh) continue;
        return invalid_argument(
            it->second == s.name
                ? fmt::format("{}: scenario \"{}\" lists the {} \"{}\" twice", at(s.line), s.name, what, m)
                : fmt::format("{}: the {} \"{}\" is listed by scenario \"{}\" and by \"{}\": each selects "
                              "one scenario",
                              at(s.line), what, m, it->second, s.name));
      }
    }
  }
  if (c.gateway.default_scenario.empty()) c.gateway.default_scenario = c.scenarios.front().name;
  if (c.find_scenario(c.gateway.default_scenario) < 0) {
    return invalid_argument(
        fmt::format("{}: gateway.default_scenario \"{}\" is not a [[scenario]] of this file", source,
                    c.gateway.default_scenario));
  }
  std::map<std::string, int> instance_line;
  // Who listens where: the same port on the same host, or on a wildcard address, clashes.
  struct Listener {
    std::string host;
    int port;
    std::string owner;
  };
  std::vector<Listener> listeners;
  auto same_host = [](const std::string& a, const std::string& b) {
    auto wildcard = [](const std::string& h) { return h == "0.0.0.0" || h == "::" || h == "[::]"; };
    auto loopback = [](const std::string& h) { return h == "localhost" || h == "127.0.0.1"; };
    return a == b || wildcard(a) || wildcard(b) || (loopback(a) && loopback(b));
  };
  std::map<std::string, int> counts;  // "<scenario> <role>" → instances
  if (c.gateway.port != 0) listeners.push_back({c.gateway.host, c.gateway.port, "the gateway"});
  for (InstanceConfig& inst : c.instances) {
    if (inst.scenario.empty()) inst.scenario = c.gateway.default_scenario;
    if (c.find_scenario(inst.scenario) < 0) {
      return invalid_argument(
          fmt::format("{}: instance {} belongs to scenario \"{}\", which is not a [[scenario]] of this file",
                      at(inst.line), inst.address(), inst.scenario));
    }
    const int n = counts[inst.scenario + " " + inst.role]++;
    if (inst.name.empty()) inst.name = fmt::format("{}-{}-{}", inst.scenario, inst.role, n);
    if (auto [it, fresh] = instance_line.emplace(inst.name, inst.line); !fresh) {
      return invalid_argument(fmt::format("{}: a second instance named \"{}\" (the first is at line {})",
                                          at(inst.line), inst.name, it->second));
    }
    for (const Listener& l : listeners) {
      if (l.port == inst.port && same_host(l.host, inst.host)) {
        return invalid_argument(fmt::format("{}: instance {} listens on {}, as does {} ({}:{})",
                                            at(inst.line), inst.name, inst.address(), l.owner, l.host,
                                            l.port));
      }
    }
    listeners.push_back({inst.host, inst.port, inst.name});
  }
  for (const ScenarioConfig& s : c.scenarios) {
    for (const char* role : {"prefill", "decode"}) {
      if (counts[s.name + " " + role] == 0) {
        return invalid_argument(fmt::format(
            "{}: scenario \"{}\" has no {} instance: add an [[instance]] with scenario = \"{}\" and "
            "role = \"{}\"",
            at(s.line), s.name, role, s.name, role));
      }
    }
  }
  return ok_status();
}

}  // namespace

int ClusterConfig::find_scenario(std::string_view name) const {
  for (size_t i = 0; i < scenarios.size(); ++i) {
    if (scenarios[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

StatusOr<ClusterConfig> parse_cluster_config(std::string_view text, std::string_view source) {
  PD_ASSIGN_OR_RETURN(const TomlValue root, parse_toml(text, source));
  ClusterConfig c;
  TableReader r(root, "", source);
  PD_RETURN_IF_ERROR(r.string("model", &c.model));
  PD_RETURN_IF_ERROR(r.string("transport", &c.transport));
  if (c.transport != "shm" && c.transport != "tcp" && c.transport != "ucx" && c.transport != "cuda-ipc") {
    return r.error_at(*root.find("transport"), "transport",
                      fmt::format("must be \"shm\" (one host), \"tcp\", \"ucx\" or \"cuda-ipc\" (GPUs of one "
                                  "host), not \"{}\"",
                                  c.transport));
  }
  if (const TomlValue* g = r.get("gateway")) {
    PD_RETURN_IF_ERROR(r.expect(*g, "gateway", TomlValue::Type::kTable));
    PD_RETURN_IF_ERROR(parse_gateway(*g, source, &c.gateway));
  }
  std::vector<std::pair<std::string, std::string>> defaults;
  if (const TomlValue* d = r.get("instance_defaults")) {
    PD_RETURN_IF_ERROR(r.expect(*d, "instance_defaults", TomlValue::Type::kTable));
    TableReader dr(*d, "instance_defaults", source);
    PD_RETURN_IF_ERROR(read_engine_flags(dr, *d, &defaults));
    PD_RETURN_IF_ERROR(dr.unknown_keys(engine_key_list()));
  }
  PD_ASSIGN_OR_RETURN(const TomlValue* scenarios, table_array(r, "scenario"));
  if (scenarios) {
    for (size_t i = 0; i < scenarios->array.size(); ++i) {
      ScenarioConfig s;
      PD_RETURN_IF_ERROR(parse_scenario(scenarios->array[i], i, source, &s));
      c.scenarios.push_back(std::move(s));
    }
  }
  if (c.scenarios.empty()) c.scenarios.push_back(ScenarioConfig{.name = "default"});
  PD_ASSIGN_OR_RETURN(const TomlValue* instances, table_array(r, "instance"));
  if (instances) {
    for (size_t i = 0; i < instances->array.size(); ++i) {
      InstanceConfig inst;
      PD_RETURN_IF_ERROR(parse_instance(instances->array[i], i, source, defaults, &inst));
      c.instances.push_back(std::move(inst));
    }
  }
  PD_RETURN_IF_ERROR(
      r.unknown_keys("model, transport, [gateway], [instance_defaults], [[scenario]], [[instance]]"));
  PD_RETURN_IF_ERROR(check(c, source));
  return c;
}

StatusOr<ClusterConfig> load_cluster_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(fmt::format("cannot read the cluster configuration {}", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_cluster_config(ss.str(), path);
}

}  // namespace pdserve
