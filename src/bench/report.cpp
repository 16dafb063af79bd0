#include "bench/report.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

namespace pdserve::bench {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Request bodies

Status validate_body_options(const BodyOptions& o) {
  if (o.extra_json.empty()) return ok_status();
  json j = json::parse(o.extra_json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid_argument("--extra-body: expected a JSON object");
  return ok_status();
}

std::string make_request_body(const BodyOptions& o, const BuiltPrompt& prompt, int32_t max_tokens,
                              std::string_view scenario) {
  json j;
  if (!o.model.empty()) j["model"] = o.model;
  if (o.api == Api::kCompletions) {
    j["prompt"] = prompt.completion_prompt();
  } else {
    json messages = json::array();
    if (!prompt.system.empty()) messages.push_back({{"role", "system"}, {"content", prompt.system}});
    messages.push_back({{"role", "user"}, {"content", prompt.body}});
    j["messages"] = std::move(messages);
  }
  j["max_tokens"] = max_tokens;
  j["temperature"] = o.temperature;
  j["stream"] = true;
  if (o.include_usage) j["stream_options"] = {{"include_usage", true}};
  if (o.ignore_eos) j["ignore_eos"] = true;
  if (o.scenario_metadata && !scenario.empty()) j["metadata"] = {{"scenario", std::string(scenario)}};
  if (!o.extra_json.empty()) {
    json extra = json::parse(o.extra_json, nullptr, false);
    if (extra.is_object()) j.merge_patch(extra);
  }
  return j.dump();
}

std::string tokenize_request_body(const std::string& text) { return json{{"content", text}}.dump(); }

StatusOr<std::string> first_model_id(const std::string& models_json) {
  json j = json::parse(models_json, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("data") || !j["data"].is_array() ||
      j["data"].empty() || !j["data"][0].is_object() || !j["data"][0].contains("id") ||
      !j["data"][0]["id"].is_string()) {
    return invalid_argument("/v1/models: expected {\"data\": [{\"id\": ...}]}");
  }
  return j["data"][0]["id"].get<std::string>();
}

StatusOr<int32_t> tokenize_count(const std::string& tokenize_json) {
  json j = json::parse(tokenize_json, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return invalid_argument("/tokenize: the answer is not a JSON object");
  if (j.contains("tokens") && j["tokens"].is_array()) return static_cast<int32_t>(j["tokens"].size());
  if (j.contains("count") && j["count"].is_number_integer()) return j["count"].get<int32_t>();
  return invalid_argument("/tokenize: expected {\"tokens\": [...]}");
}

// ---------------------------------------------------------------------------------------------
// Prometheus

std::map<std::string, double> parse_prometheus_text(std::string_view text) {
  std::map<std::string, double> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
    if (line.empty() || line[0] == '#') continue;
    // name{labels} value [timestamp]; label values may hold spaces, so find the closing brace.
    size_t name_end = line.find_first_of("{ ");
    if (name_end == std::string_view::npos) continue;
    size_t key_end = name_end;
    if (line[name_end] == '{') {
      bool in_quotes = false;
      size_t i = name_end + 1;
      for (; i < line.size(); ++i) {
        if (line[i] == '\\' && in_quotes) {
          ++i;
        } else if (line[i] == '"') {
          in_quotes = !in_quotes;
        } else if (line[i] == '}' && !in_quotes) {
          break;
        }
      }
      if (i >= line.size()) continue;
      key_end = i + 1;
    }
    std::string_view rest = line.substr(key_end);
    while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
    rest = rest.substr(0, rest.find(' '));
    std::string value(rest);
    char* parse_end = nullptr;
    double v = std::strtod(value.c_str(), &parse_end);
    if (value.empty() || parse_end != value.c_str() + value.size()) continue;
    out[std::string(line.substr(0, key_end))] = v;
  }
  return out;
}

std::vector<std::pair<std::string, double>> counter_deltas(const std::map<std::string, double>& before,
                                                           const std::map<std::string, double>& after) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& [key, v] : after) {
    std::string_view name = std::string_view(key).substr(0, key.find('{'));
    auto ends = [&](std::string_view s) {
      return name.size() >= s.size() && name.substr(name.size() - s.size()) == s;
    };
    if (!ends("_total") && !ends("_count") && !ends("_sum")) continue;
    auto it = before.find(key);
    double d = v - (it == before.end() ? 0 : it->second);
    if (d != 0) out.emplace_back(key, d);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Text reports

namespace {

std::string latency_row(std::string_view name, const LatencyStats& s) {
  return fmt::format("  {:<10} {:>10.2f} {:>10.2f} {:>10.2f} {:>10.2f} {:>10.2f} {:>9}\n", name, s.mean,
                     s.p50, s.p90, s.p99, s.max, s.count);
}

json latency_json(const LatencyStats& s) {
  return {{"count", s.count}, {"mean", s.mean}, {"min", s.min}, {"p50", s.p50},
          {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
}

json summary_json(const Summary& s) {
  return {{"duration_s", s.duration_s},
          {"num_requests", s.num_requests},
          {"num_ok", s.num_ok},
          {"num_errors", s.num_errors},
          {"num_cancelled", s.num_cancelled},
          {"num_not_sent", s.num_not_sent},
          {"errors_by_type", s.errors_by_type},
          {"input_tokens", s.input_tokens},
          {"output_tokens", s.output_tokens},
          {"requests_per_s", s.requests_per_s},
          {"output_tokens_per_s", s.output_tokens_per_s},
          {"total_tokens_per_s", s.total_tokens_per_s},
          {"ttft_ms", latency_json(s.ttft_ms)},
          {"tpot_ms", latency_json(s.tpot_ms)},
          {"itl_ms", latency_json(s.itl_ms)},
          {"e2e_ms", latency_json(s.e2e_ms)},
          {"send_lag_ms", latency_json(s.send_lag_ms)},
          {"slo",
           {{"ttft_ms", s.slo.ttft_ms},
            {"ttft_ms_per_token", s.slo.ttft_ms_per_token},
            {"tpot_ms", s.slo.tpot_ms}}},
          {"ttft_attainment", s.ttft_attainment},
          {"tpot_attainment", s.tpot_attainment},
          {"slo_attainment", s.slo_attainment},
          {"goodput_rps", s.goodput_rps},
          {"usage_mismatches", s.usage_mismatches}};
}

json record_json(const RequestRecord& r, bool chunk_times) {
  json j = {{"id", r.id},
            {"scenario", r.scenario_idx},
            {"scheduled_s", r.scheduled_s},
            {"send_s", r.send_s},
            {"first_token_s", r.first_token_s},
            {"end_s", r.end_s},
            {"ttft_ms", r.ttft_s() >= 0 ? json(r.ttft_s() * 1e3) : json(nullptr)},
            {"tpot_ms", r.tpot_s() >= 0 ? json(r.tpot_s() * 1e3) : json(nullptr)},
            {"e2e_ms", r.e2e_s() >= 0 ? json(r.e2e_s() * 1e3) : json(nullptr)},
            {"planned_input_tokens", r.planned_input_tokens},
            {"planned_output_tokens", r.planned_output_tokens},
            {"prompt_tokens", r.prompt_tokens >= 0 ? json(r.prompt_tokens) : json(nullptr)},
            {"output_tokens", r.output_tokens},
            {"usage_reported", r.usage_reported},
            {"num_chunks", r.num_chunks},
            {"reused_connection", r.reused_connection},
            {"http_status", r.http_status}};
  if (!r.ok()) {
    j["error"] = r.error;
    j["error_message"] = r.error_message;
  }
  if (chunk_times) j["chunk_s"] = r.chunk_s;
  return j;
}

}  // namespace

std::string format_summary(const Summary& s, std::string_view title) {
  std::string out = fmt::format("==== {} ====\n", title);
  out += fmt::format("  requests: {} ok, {} failed", s.num_ok, s.num_errors);
  if (s.num_cancelled) out += fmt::format(", {} cancelled (not counted)", s.num_cancelled);
  if (s.num_not_sent) out += fmt::format(", {} not sent", s.num_not_sent);
  out += fmt::format(" in {:.2f} s\n", s.duration_s);
  for (const auto& [type, n] : s.errors_by_type) out += fmt::format("    error {}: {}\n", type, n);
  out += fmt::format(
      "  throughput: {:.2f} req/s, {:.1f} output tok/s, {:.1f} total tok/s ({} in, {} out tokens)\n",
      s.requests_per_s, s.output_tokens_per_s, s.total_tokens_per_s, s.input_tokens, s.output_tokens);
  out += fmt::format("  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}\n", "ms", "mean", "p50", "p90", "p99",
                     "max", "n");
  out += latency_row("TTFT", s.ttft_ms);
  out += latency_row("TPOT", s.tpot_ms);
  out += latency_row("ITL", s.itl_ms);
  out += latency_row("E2E", s.e2e_ms);
  out += latency_row("send lag", s.send_lag_ms);
  if (s.slo.ttft_ms > 0 || s.slo.tpot_ms > 0) {
    out += fmt::format(
        "  SLO (TTFT <= {} ms, TPOT <= {} ms): TTFT {:.1f} %, TPOT {:.1f} %, both {:.1f} %; goodput {:.2f} "
        "req/s\n",
        s.slo.ttft_ms <= 0 ? std::string("-")
        : s.slo.ttft_ms_per_token > 0
            ? fmt::format("{:g} + {:g}/token", s.slo.ttft_ms, s.slo.ttft_ms_per_token)
            : fmt::format("{:g}", s.slo.ttft_ms),
        s.slo.tpot_ms > 0 ? fmt::format("{:g}", s.slo.tpot_ms) : "-", s.ttft_attainment * 100,
        s.tpot_attainment * 100, s.slo_attainment * 100, s.goodput_rps);
  }
  if (s.usage_mismatches > 0) {
    out += fmt::format(
        "  note: {} responses packed several tokens per chunk (usage != chunks); ITL is per chunk\n",
        s.usage_mismatches);
  }
  return out;
}

std::string format_sweep_table(const std::vector<RunResult>& runs) {
  std::string out =
      fmt::format("{:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9}\n", "rate", "req/s",
                  "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "SLO %", "goodput");
  for (const RunResult& r : runs) {
    const Summary& s = r.summary;
    out += fmt::format(
        "{:>10} {:>9.2f} {:>10.1f} {:>10.1f} {:>10.1f} {:>10.2f} {:>10.2f} {:>8.1f} {:>9.2f}\n",
        r.rate_rps > 0 ? fmt::format("{:g}", r.rate_rps) : r.label, s.requests_per_s, s.output_tokens_per_s,
        s.ttft_ms.p50, s.ttft_ms.p99, s.tpot_ms.p50, s.tpot_ms.p99, s.slo_attainment * 100, s.goodput_rps);
  }
  return out;
}

std::string format_ab_table(const std::vector<RunResult>& runs) {
  struct Side {
    std::vector<RequestRecord> records;
    double rps = 0, tok_s = 0, goodput = 0;
    int n = 0;
  };
  Side sides[2];
  SloSpec slo;
  for (const RunResult& r : runs) {
    if (r.label.empty() || (r.label[0] != 'A' && r.label[0] != 'B')) continue;
    Side& side = sides[r.label[0] == 'A' ? 0 : 1];
    side.records.insert(side.records.end(), r.records.begin(), r.records.end());
    side.rps += r.summary.requests_per_s;
    side.tok_s += r.summary.output_tokens_per_s;
    side.goodput += r.summary.goodput_rps;
    ++side.n;
    slo = r.summary.slo;
  }
  if (sides[0].n == 0 || sides[1].n == 0) return "";
  Summary sa = summarize(sides[0].records, slo), sb = summarize(sides[1].records, slo);
  std::string out = fmt::format("==== A/B ({} + {} runs) ====\n{:<22} {:>12} {:>12} {:>8}\n", sides[0].n,
                                sides[1].n, "", "A", "B", "B/A");
  auto row = [&](std::string_view name, double va, double vb) {
    out += fmt::format("{:<22} {:>12.3f} {:>12.3f} {:>8}\n", name, va, vb,
                       va != 0 ? fmt::format("{:.3f}", vb / va) : "-");
  };
  row("requests/s", sides[0].rps / sides[0].n, sides[1].rps / sides[1].n);
  row("output tokens/s", sides[0].tok_s / sides[0].n, sides[1].tok_s / sides[1].n);
  row("goodput req/s", sides[0].goodput / sides[0].n, sides[1].goodput / sides[1].n);
  row("TTFT p50 ms", sa.ttft_ms.p50, sb.ttft_ms.p50);
  row("TTFT p99 ms", sa.ttft_ms.p99, sb.ttft_ms.p99);
  row("TPOT p50 ms", sa.tpot_ms.p50, sb.tpot_ms.p50);
  row("TPOT p99 ms", sa.tpot_ms.p99, sb.tpot_ms.p99);
  row("ITL p50 ms", sa.itl_ms.p50, sb.itl_ms.p50);
  row("E2E p50 ms", sa.e2e_ms.p50, sb.e2e_ms.p50);
  row("E2E p99 ms", sa.e2e_ms.p99, sb.e2e_ms.p99);
  row("SLO attainment", sa.slo_attainment, sb.slo_attainment);
  row("errors", static_cast<double>(sa.num_errors), static_cast<double>(sb.num_errors));
  return out;
}

std::string format_metric_deltas(const std::vector<std::pair<std::string, double>>& deltas,
                                 size_t max_lines) {
  std::string out;
  size_t n = 0;
  for (const auto& [key, d] : deltas) {
    if (n++ >= max_lines) {
      out += fmt::format("  ... {} more in the JSON report\n", deltas.size() - max_lines);
      break;
    }
    out += fmt::format("  {:<70} {:>+14.6g}\n", key, d);
  }
  return out;
}

Status write_json_report(const std::string& path, const Report& report) {
  json j;
  j["tool"] = "pdserve bench";
  j["format_version"] = 1;
  j["date_utc"] = report.date_utc;
  j["command_line"] = report.command_line;
  j["base_url"] = report.base_url;
  j["api"] = report.api;
  j["model"] = report.model;
  j["workload"] = report.workload;
  j["scenarios"] = report.scenarios;
  json runs = json::array();
  for (const RunResult& r : report.runs) {
    json jr;
    jr["label"] = r.label;
    jr["rate_rps"] = r.rate_rps > 0 ? json(r.rate_rps) : json(nullptr);
    jr["summary"] = summary_json(r.summary);
    json per = json::object();
    for (const auto& [name, s] : r.per_scenario) per[name] = summary_json(s);
    jr["per_scenario"] = std::move(per);
    json deltas = json::object();
    for (const auto& [k, v] : r.metric_deltas) deltas[k] = v;
    jr["server_metric_deltas"] = std::move(deltas);
    json series = json::array();
    for (const MetricsSample& m : r.metrics_series) series.push_back({{"t_s", m.t_s}, {"values", m.values}});
    jr["server_metrics_series"] = std::move(series);
    json reqs = json::array();
    for (const RequestRecord& rec : r.records) reqs.push_back(record_json(rec, report.save_chunk_times));
    jr["requests"] = std::move(reqs);
    runs.push_back(std::move(jr));
  }
  j["runs"] = std::move(runs);
  std::ofstream out(path);
  if (!out) return invalid_argument(fmt::format("cannot write '{}'", path));
  out << j.dump(1) << '\n';
  if (!out) return data_loss(fmt::format("error writing '{}'", path));
  return ok_status();
}

}  // namespace pdserve::bench
