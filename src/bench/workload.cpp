#include "bench/workload.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <istream>
#include <nlohmann/json.hpp>
#include <numeric>

namespace pdserve::bench {

namespace {

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    size_t pos = s.find(sep, start);
    out.push_back(s.substr(start, pos == std::string_view::npos ? std::string_view::npos : pos - start));
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool parse_double(std::string_view s, double& out) {
  s = trim(s);
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() && std::isfinite(out);
}

bool parse_int(std::string_view s, int64_t& out) {
  s = trim(s);
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

int32_t scale_length(int32_t n, double scale, int32_t cap) {
  int64_t v = std::llround(static_cast<double>(n) * scale);
  v = std::max<int64_t>(v, 1);
  if (cap > 0) v = std::min<int64_t>(v, cap);
  return static_cast<int32_t>(std::min<int64_t>(v, std::numeric_limits<int32_t>::max()));
}

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const int64_t yoe = y - era * 400;
  const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

// "YYYY-MM-DD HH:MM:SS[.fraction]" -> seconds since the epoch; or a plain number of seconds.
bool parse_timestamp(std::string_view s, double& out) {
  s = trim(s);
  if (parse_double(s, out)) return true;
  if (s.size() < 19 || s[4] != '-' || s[7] != '-' || (s[10] != ' ' && s[10] != 'T') || s[13] != ':' ||
      s[16] != ':') {
    return false;
  }
  int64_t y, mo, d, h, mi, sec;
  if (!parse_int(s.substr(0, 4), y) || !parse_int(s.substr(5, 2), mo) || !parse_int(s.substr(8, 2), d) ||
      !parse_int(s.substr(11, 2), h) || !parse_int(s.substr(14, 2), mi) || !parse_int(s.substr(17, 2), sec)) {
    return false;
  }
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return false;
  double frac = 0;
  std::string_view rest = s.substr(19);
  if (!rest.empty()) {
    if (rest[0] != '.' || rest.size() < 2) return false;
    for (char c : rest.substr(1)) {
      if (c < '0' || c > '9') return false;
    }
    if (!parse_double(fmt::format("0{}", rest), frac)) return false;
  }
  out = static_cast<double>(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) + frac;
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Lengths

double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

double sample_normal(std::mt19937_64& rng) {
  double u1 = 1.0 - uniform01(rng);  // (0, 1]
  double u2 = uniform01(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

double sample_gamma(std::mt19937_64& rng, double shape, double scale) {
  if (shape < 1) {
    // Gamma(a) = Gamma(a + 1) * U^(1/a)
    double u = 1.0 - uniform01(rng);
    return sample_gamma(rng, shape + 1, scale) * std::pow(u, 1.0 / shape);
  }
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  while (true) {
    double x = sample_normal(rng);
    double v = 1.0 + c * x;
    if (v <= 0) continue;
    v = v * v * v;
    double u = 1.0 - uniform01(rng);
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v * scale;
  }
}

int32_t LengthDist::sample(std::mt19937_64& rng) const {
  double v = a;
  switch (kind) {
    case Kind::kFixed: v = a; break;
    case Kind::kUniform: {
      int64_t lo = std::llround(a), hi = std::llround(b);
      v = static_cast<double>(lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1)));
      break;
    }
    case Kind::kNormal: v = a + b * sample_normal(rng); break;
  }
  return static_cast<int32_t>(std::clamp<double>(std::round(v), 1, std::numeric_limits<int32_t>::max()));
}

double LengthDist::mean() const { return kind == Kind::kUniform ? (a + b) / 2 : a; }

std::string LengthDist::to_string() const {
  switch (kind) {
    case Kind::kFixed: return fmt::format("fixed:{}", a);
    case Kind::kUniform: return fmt::format("uniform:{}:{}", a, b);
    case Kind::kNormal: return fmt::format("normal:{}:{}", a, b);
  }
  return "?";
}

StatusOr<LengthDist> parse_length_dist(std::string_view spec) {
  auto parts = split(spec, ':');
  auto bad = [&](std::string_view why) {
    return invalid_argument(fmt::format(
        "length '{}': {} (expected N, fixed:N, uniform:MIN:MAX or normal:MEAN:STDDEV)", spec, why));
  };
  LengthDist d;
  std::vector<double> v;
  std::string_view kind = parts.size() == 1 ? "fixed" : parts[0];
  for (size_t i = parts.size() == 1 ? 0 : 1; i < parts.size(); ++i) {
    double x;
    if (!parse_double(parts[i], x)) return bad(fmt::format("'{}' is not a number", parts[i]));
    v.push_back(x);
  }
  if (kind == "fixed") {
    if (v.size() != 1) return bad("fixed takes one value");
    if (v[0] < 1) return bad("must be >= 1");
    d.kind = LengthDist::Kind::kFixed;
    d.a = std::round(v[0]);
  } else if (kind == "uniform") {
    if (v.size() != 2) return bad("uniform takes MIN:MAX");
    if (v[0] < 1 || v[1] < v[0]) return bad("needs 1 <= MIN <= MAX");
    d.kind = LengthDist::Kind::kUniform;
    d.a = std::round(v[0]);
    d.b = std::round(v[1]);
  } else if (kind == "normal") {
    if (v.size() != 2) return bad("normal takes MEAN:STDDEV");
    if (v[0] < 1 || v[1] < 0) return bad("needs MEAN >= 1 and STDDEV >= 0");
    d.kind = LengthDist::Kind::kNormal;
    d.a = v[0];
    d.b = v[1];
  } else {
    return bad(fmt::format("unknown kind '{}'", kind));
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Arrivals

StatusOr<ArrivalProcess::Kind> parse_arrival_kind(std::string_view name) {
  if (name == "poisson") return ArrivalProcess::Kind::kPoisson;
  if (name == "gamma") return ArrivalProcess::Kind::kGamma;
  if (name == "tidal") return ArrivalProcess::Kind::kTidal;
  if (name == "constant") return ArrivalProcess::Kind::kConstant;
  return invalid_argument(
      fmt::format("unknown arrival process '{}' (poisson, gamma, tidal, constant)", name));
}

std::string ArrivalProcess::to_string() const {
  switch (kind) {
    case Kind::kPoisson: return fmt::format("poisson {} req/s", rate_rps);
    case Kind::kGamma: return fmt::format("gamma {} req/s cv {}", rate_rps, cv);
    case Kind::kTidal: return fmt::format("tidal {} req/s mean, period {} s", rate_rps, period_s);
    case Kind::kConstant: return fmt::format("constant {} req/s", rate_rps);
  }
  return "?";
}

std::vector<double> default_tidal_curve() {
  // Hour 0..23: low at night (about 04:00), a morning rise, a midday plateau, the evening peak.
  return {0.45, 0.35, 0.28, 0.24, 0.22, 0.25, 0.38, 0.60, 0.85, 1.05, 1.15, 1.20,
          1.18, 1.15, 1.15, 1.18, 1.22, 1.30, 1.40, 1.48, 1.45, 1.25, 0.95, 0.65};
}

double tidal_factor(const std::vector<double>& curve, double phase) {
  const size_t n = curve.size();
  double mean = std::accumulate(curve.begin(), curve.end(), 0.0) / static_cast<double>(n);
  double pos = (phase - std::floor(phase)) * static_cast<double>(n);
  size_t i = static_cast<size_t>(pos) % n;
  double f = pos - std::floor(pos);
  return (curve[i] * (1 - f) + curve[(i + 1) % n] * f) / mean;
}

std::vector<double> generate_arrivals(const ArrivalProcess& p, int64_t max_requests, double duration_s,
                                      std::mt19937_64& rng) {
  PD_CHECK(max_requests > 0 || duration_s > 0);
  PD_CHECK(p.rate_rps > 0);
  std::vector<double> out;
  auto more = [&](double t) {
    return (max_requests <= 0 || static_cast<int64_t>(out.size()) < max_requests) &&
           (duration_s <= 0 || t < duration_s);
  };
  double t = 0;
  switch (p.kind) {
    case ArrivalProcess::Kind::kConstant:
      while (true) {
        if (!more(t)) break;
        out.push_back(t);
        t += 1.0 / p.rate_rps;
      }
      break;
    case ArrivalProcess::Kind::kPoisson:
    case ArrivalProcess::Kind::kGamma: {
      // Gamma inter-arrival times with mean 1/rate and CV cv (shape 1/cv^2); CV 1 = exponential.
      double cv = p.kind == ArrivalProcess::Kind::kPoisson ? 1.0 : p.cv;
      double shape = 1.0 / (cv * cv);
      double scale = 1.0 / (p.rate_rps * shape);
      while (true) {
        t += p.kind == ArrivalProcess::Kind::kPoisson ? -std::log(1.0 - uniform01(rng)) / p.rate_rps
                                                      : sample_gamma(rng, shape, scale);
        if (!more(t)) break;
        out.push_back(t);
      }
      break;
    }
    case ArrivalProcess::Kind::kTidal: {
      // Non-homogeneous Poisson process by thinning (Lewis & Shedler).
      std::vector<double> curve = p.curve.size() >= 2 ? p.curve : default_tidal_curve();
      double mean = std::accumulate(curve.begin(), curve.end(), 0.0) / static_cast<double>(curve.size());
      double peak = *std::max_element(curve.begin(), curve.end()) / mean;
      double rate_max = p.rate_rps * peak;
      while (true) {
        t += -std::log(1.0 - uniform01(rng)) / rate_max;
        if (!more(t)) break;
        if (uniform01(rng) * peak < tidal_factor(curve, t / p.period_s)) out.push_back(t);
      }
      break;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scenarios

StatusOr<std::vector<Scenario>> parse_scenarios(std::string_view text, const Scenario& defaults) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return invalid_argument("scenarios: not valid JSON");
  if (j.is_object() && j.contains("scenarios")) j = j["scenarios"];
  if (!j.is_array() || j.empty())
    return invalid_argument("scenarios: expected a non-empty JSON array of objects");
  std::vector<Scenario> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const nlohmann::json& o = j[i];
    Scenario s = defaults;
    s.name = fmt::format("s{}", i);
    auto where = [&](std::string_view field) {
      return fmt::format("scenario {} ('{}'), field '{}'", i, s.name, field);
    };
    if (!o.is_object()) return invalid_argument(fmt::format("scenario {}: expected an object", i));
    for (const auto& [key, v] : o.items()) {
      if (key == "name") {
        if (!v.is_string()) return invalid_argument(where(key) + ": expected a string");
        s.name = v.get<std::string>();
      } else if (key == "rate" || key == "cv" || key == "period_s" || key == "weight") {
        if (!v.is_number() || v.get<double>() <= 0)
          return invalid_argument(where(key) + ": expected a number > 0");
        double x = v.get<double>();
        if (key == "rate") s.arrival.rate_rps = x;
        if (key == "cv") s.arrival.cv = x;
        if (key == "period_s") s.arrival.period_s = x;
        if (key == "weight") s.weight = x;
      } else if (key == "arrival") {
        if (!v.is_string()) return invalid_argument(where(key) + ": expected a string");
        auto k = parse_arrival_kind(v.get<std::string>());
        if (!k.ok()) return k.status().with_context(where(key));
        s.arrival.kind = *k;
      } else if (key == "input" || key == "output") {
        std::string spec = v.is_number_integer() ? std::to_string(v.get<int64_t>())
                           : v.is_string()       ? v.get<std::string>()
                                                 : "";
        auto d = parse_length_dist(spec);
        if (!d.ok()) return d.status().with_context(where(key));
        (key == "input" ? s.input : s.output) = *d;
      } else if (key == "system_prompt") {
        if (!v.is_string()) return invalid_argument(where(key) + ": expected a string");
        s.system_prompt = v.get<std::string>();
      } else if (key == "system_tokens") {
        if (!v.is_number_integer() || v.get<int64_t>() < 0)
          return invalid_argument(where(key) + ": expected an integer >= 0");
        s.system_prompt_tokens = static_cast<int32_t>(v.get<int64_t>());
      } else if (key == "curve") {
        if (!v.is_array() || v.size() < 2)
          return invalid_argument(where(key) + ": expected an array of >= 2 numbers");
        s.arrival.curve.clear();
        for (const auto& x : v) {
          if (!x.is_number() || x.get<double>() < 0)
            return invalid_argument(where(key) + ": expected numbers >= 0");
          s.arrival.curve.push_back(x.get<double>());
        }
      } else {
        return invalid_argument(where(key) +
                                ": unknown field (name, rate, arrival, cv, period_s, curve, input, "
                                "output, system_prompt, system_tokens, weight)");
      }
    }
    out.push_back(std::move(s));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Traces

StatusOr<std::vector<TraceRecord>> parse_mooncake_trace(std::istream& in, std::string_view name) {
  std::vector<TraceRecord> out;
  std::string line;
  int64_t line_no = 0;
  double first_ms = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (trim(line).empty()) continue;
    auto err = [&](std::string_view why) {
      return invalid_argument(fmt::format("{}:{}: {}", name, line_no, why));
    };
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return err("not a JSON object");
    TraceRecord r;
    for (const char* key : {"timestamp", "input_length", "output_length"}) {
      if (!j.contains(key)) return err(fmt::format("missing field '{}'", key));
      if (!j[key].is_number() || j[key].get<double>() < 0)
        return err(fmt::format("'{}' must be a number >= 0", key));
    }
    double ts_ms = j["timestamp"].get<double>();
    if (out.empty()) first_ms = ts_ms;
    r.timestamp_s = (ts_ms - first_ms) / 1e3;
    if (!out.empty() && r.timestamp_s < out.back().timestamp_s) return err("timestamps go backwards");
    r.input_tokens = static_cast<int32_t>(std::min<double>(j["input_length"].get<double>(), 1e9));
    r.output_tokens = static_cast<int32_t>(std::min<double>(j["output_length"].get<double>(), 1e9));
    if (j.contains("hash_ids")) {
      if (!j["hash_ids"].is_array()) return err("'hash_ids' must be an array of integers");
      for (const auto& h : j["hash_ids"]) {
        if (!h.is_number_integer()) return err("'hash_ids' must be an array of integers");
        r.hash_ids.push_back(h.get<int64_t>());
      }
    }
    out.push_back(std::move(r));
  }
  if (out.empty()) return invalid_argument(fmt::format("{}: no requests in the trace", name));
  return out;
}

StatusOr<std::vector<TraceRecord>> parse_azure_trace(std::istream& in, std::string_view name) {
  std::vector<TraceRecord> out;
  std::string line;
  int64_t line_no = 0;
  int ts_col = -1, in_col = -1, out_col = -1;
  double first = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (trim(line).empty()) continue;
    auto err = [&](std::string_view why) {
      return invalid_argument(fmt::format("{}:{}: {}", name, line_no, why));
    };
    auto cols = split(line, ',');
    if (ts_col < 0) {
      for (size_t i = 0; i < cols.size(); ++i) {
        std::string_view c = trim(cols[i]);
        if (c == "TIMESTAMP") ts_col = static_cast<int>(i);
        if (c == "ContextTokens") in_col = static_cast<int>(i);
        if (c == "GeneratedTokens") out_col = static_cast<int>(i);
      }
      if (ts_col < 0 || in_col < 0 || out_col < 0) {
        return err("expected the header TIMESTAMP,ContextTokens,GeneratedTokens");
      }
      continue;
    }
    size_t need = static_cast<size_t>(std::max({ts_col, in_col, out_col})) + 1;
    if (cols.size() < need) return err(fmt::format("expected {} columns, got {}", need, cols.size()));
    double ts;
    if (!parse_timestamp(cols[ts_col], ts)) return err(fmt::format("bad TIMESTAMP '{}'", trim(cols[ts_col])));
    int64_t ni, no;
    if (!parse_int(cols[in_col], ni) || ni < 0)
      return err(fmt::format("bad ContextTokens '{}'", trim(cols[in_col])));
    if (!parse_int(cols[out_col], no) || no < 0)
      return err(fmt::format("bad GeneratedTokens '{}'", trim(cols[out_col])));
    if (out.empty()) first = ts;
    TraceRecord r;
    r.timestamp_s = ts - first;
    if (!out.empty() && r.timestamp_s < out.back().timestamp_s) return err("timestamps go backwards");
    r.input_tokens = static_cast<int32_t>(std::min<int64_t>(ni, 1'000'000'000));
    r.output_tokens = static_cast<int32_t>(std::min<int64_t>(no, 1'000'000'000));
    out.push_back(std::move(r));
  }
  if (ts_col < 0) return invalid_argument(fmt::format("{}: empty file (expected a CSV header)", name));
  if (out.empty()) return invalid_argument(fmt::format("{}: no requests in the trace", name));
  return out;
}

StatusOr<std::vector<TraceRecord>> load_trace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return not_found(fmt::format("cannot open trace '{}'", path));
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() &&
           path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with(".jsonl") || ends_with(".json")) return parse_mooncake_trace(in, path);
  if (ends_with(".csv")) return parse_azure_trace(in, path);
  return invalid_argument(
      fmt::format("trace '{}': unknown format (expected .jsonl Mooncake or .csv Azure)", path));
}

// ---------------------------------------------------------------------------------------------
// Plans

StatusOr<std::vector<PlannedRequest>> plan_synthetic(const std::vector<Scenario>& scenarios,
                                                     const PlanOptions& o) {
  if (scenarios.empty()) return invalid_argument("no scenarios");
  std::vector<PlannedRequest> out;
  std::mt19937_64 rng(o.seed);
  if (o.closed_loop) {
    if (o.max_requests <= 0) return invalid_argument("closed loop needs a number of requests");
    double total = 0;
    for (const Scenario& s : scenarios) total += s.weight;
    for (int64_t i = 0; i < o.max_requests; ++i) {
      double u = uniform01(rng) * total;
      size_t k = 0;
      while (k + 1 < scenarios.size() && u >= scenarios[k].weight) u -= scenarios[k++].weight;
      PlannedRequest r;
      r.scenario_idx = static_cast<int32_t>(k);
      r.input_tokens = scenarios[k].input.sample(rng);
      r.output_tokens = scenarios[k].output.sample(rng);
      r.seed = rng();
      out.push_back(std::move(r));
    }
  } else {
    if (o.max_requests <= 0 && o.duration_s <= 0)
      return invalid_argument("open loop needs --num-requests or --duration");
    for (size_t k = 0; k < scenarios.size(); ++k) {
      if (scenarios[k].arrival.rate_rps <= 0) {
        return invalid_argument(fmt::format("scenario '{}': the rate must be > 0", scenarios[k].name));
      }
      std::mt19937_64 srng(o.seed * 1000003 + k);
      for (double t : generate_arrivals(scenarios[k].arrival, o.max_requests, o.duration_s, srng)) {
        PlannedRequest r;
        r.arrival_s = t;
        r.scenario_idx = static_cast<int32_t>(k);
        r.input_tokens = scenarios[k].input.sample(srng);
        r.output_tokens = scenarios[k].output.sample(srng);
        r.seed = srng();
        out.push_back(std::move(r));
      }
    }
    std::stable_sort(out.begin(), out.end(), [](const PlannedRequest& a, const PlannedRequest& b) {
      return a.arrival_s < b.arrival_s;
    });
    if (o.max_requests > 0 && static_cast<int64_t>(out.size()) > o.max_requests) out.resize(o.max_requests);
  }
  for (size_t i = 0; i < out.size(); ++i) out[i].id = static_cast<int64_t>(i);
  return out;
}

StatusOr<std::vector<PlannedRequest>> plan_trace(const std::vector<TraceRecord>& trace,
                                                 const TraceReplayOptions& o) {
  if (o.speedup <= 0 || o.input_scale <= 0 || o.output_scale <= 0) {
    return invalid_argument("trace speedup and length scales must be > 0");
  }
  std::mt19937_64 rng(o.seed);
  std::vector<PlannedRequest> out;
  double t0 = -1;
  for (const TraceRecord& tr : trace) {
    if (tr.timestamp_s < o.start_s) continue;
    if (t0 < 0) t0 = tr.timestamp_s;
    double t = (tr.timestamp_s - t0) / o.speedup;
    if (o.duration_s > 0 && t >= o.duration_s) break;
    if (o.max_requests > 0 && static_cast<int64_t>(out.size()) >= o.max_requests) break;
    PlannedRequest r;
    r.id = static_cast<int64_t>(out.size());
    r.arrival_s = t;
    r.input_tokens = scale_length(tr.input_tokens, o.input_scale, o.max_input_tokens);
    r.output_tokens = scale_length(tr.output_tokens, o.output_scale, o.max_output_tokens);
    r.hash_ids = tr.hash_ids;
    r.seed = rng();
    out.push_back(std::move(r));
  }
  if (out.empty()) return invalid_argument("the trace has no requests after --trace-start");
  return out;
}

}  // namespace pdserve::bench
