// Workloads for `pdserve bench`: request length distributions, arrival processes (Poisson,
// gamma, tidal, closed loop), trace replay (Mooncake JSONL, Azure CSV) and multi-scenario mixes,
// all turned into a plan — the list of requests to send, with arrival times and lengths.
//
// Everything is deterministic for a given seed (std::mt19937_64 and hand-written samplers, so
// the sequence is the same with every standard library). Pure functions and value types; no
// I/O except the trace loaders, which read a file.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace pdserve::bench {

// A token-length distribution. Spec syntax: "N" or "fixed:N", "uniform:MIN:MAX" (integers,
// both inclusive), "normal:MEAN:STDDEV" (rounded, clamped to >= 1).
struct LengthDist {
  enum class Kind { kFixed, kUniform, kNormal };
  Kind kind = Kind::kFixed;
  double a = 128;  // fixed value, uniform minimum or normal mean
  double b = 0;    // uniform maximum or normal standard deviation

  int32_t sample(std::mt19937_64& rng) const;
  double mean() const;
  std::string to_string() const;
};
StatusOr<LengthDist> parse_length_dist(std::string_view spec);

// Samplers with a fixed algorithm (the standard distributions are implementation-defined).
double uniform01(std::mt19937_64& rng);                                 // [0, 1)
double sample_normal(std::mt19937_64& rng);                             // N(0, 1), Box-Muller
double sample_gamma(std::mt19937_64& rng, double shape, double scale);  // Marsaglia-Tsang

// Open-loop arrival process of one scenario.
struct ArrivalProcess {
  enum class Kind { kPoisson, kGamma, kTidal, kConstant };
  Kind kind = Kind::kPoisson;
  double rate_rps = 1;    // mean requests per second (for tidal: the mean over a period)
  double cv = 1;          // gamma: coefficient of variation of inter-arrival times (burstiness)
  double period_s = 600;  // tidal: one "day" lasts this many seconds
  // tidal: relative load at each hour of the day (any length >= 2, points spread evenly over
  // the period, linearly interpolated, cyclic); scaled so that its mean is 1.
  std::vector<double> curve;
  std::string to_string() const;
};
StatusOr<ArrivalProcess::Kind> parse_arrival_kind(std::string_view name);
// A typical daily load curve of an interactive service (24 hourly points: night trough at about
// a fifth of the evening peak).
std::vector<double> default_tidal_curve();
// Relative rate (mean 1) of `curve` at phase in [0, 1).
double tidal_factor(const std::vector<double>& curve, double phase);
// Arrival times in seconds from 0, ascending: at most max_requests (<= 0: unlimited) and all
// before duration_s (<= 0: unlimited; one of the two limits must be set).
std::vector<double> generate_arrivals(const ArrivalProcess& p, int64_t max_requests, double duration_s,
                                      std::mt19937_64& rng);

// One scenario of a mix: its own system prompt, lengths and rate.
struct Scenario {
  std::string name = "default";
  std::string system_prompt;         // literal text, or
  int32_t system_prompt_tokens = 0;  // a generated shared prefix of this many tokens
  LengthDist input;                  // prompt tokens (including the system prompt)
  LengthDist output;                 // max_tokens
  ArrivalProcess arrival;
  double weight = 1;  // closed loop: share of the requests
};
// Parses a scenario mix: a JSON array (or {"scenarios": [...]}) of objects with "name",
// "rate", "arrival" (poisson|gamma|tidal|constant), "cv", "period_s", "input", "output"
// (length specs), "system_prompt" or "system_tokens", "weight". Missing fields take the values
// of `defaults`. Errors name the scenario and field.
StatusOr<std::vector<Scenario>> parse_scenarios(std::string_view json, const Scenario& defaults);

// A request of a trace.
struct TraceRecord {
  double timestamp_s = 0;  // from the first request of the trace
  int32_t input_tokens = 0;
  int32_t output_tokens = 0;
  std::vector<int64_t> hash_ids;  // Mooncake prefix blocks
};
// Mooncake JSONL: one object a line {"timestamp": ms, "input_length", "output_length",
// "hash_ids": [...]} (hash_ids optional). Errors give `name:line`.
StatusOr<std::vector<TraceRecord>> parse_mooncake_trace(std::istream& in, std::string_view name);
// Azure LLM inference trace CSV: header TIMESTAMP,ContextTokens,GeneratedTokens, timestamps
// "YYYY-MM-DD HH:MM:SS.fffffff" (or plain seconds). Errors give `name:line`.
StatusOr<std::vector<TraceRecord>> parse_azure_trace(std::istream& in, std::string_view name);
// By extension: .jsonl -> Mooncake, .csv -> Azure.
StatusOr<std::vector<TraceRecord>> load_trace(const std::string& path);

// A request to send.
struct PlannedRequest {
  int64_t id = 0;
  double arrival_s = 0;  // open loop: offset from the start; closed loop: unused
  int32_t scenario_idx = 0;
  int32_t input_tokens = 0;
  int32_t output_tokens = 0;
  std::vector<int64_t> hash_ids;  // shared prefix blocks (trace replay)
  uint64_t seed = 0;              // the request's own (unshared) prompt words
};

struct PlanOptions {
  int64_t max_requests = 0;  // <= 0: unlimited
  double duration_s = 0;     // <= 0: unlimited
  uint64_t seed = 0;
  bool closed_loop = false;  // no arrival times; scenarios drawn by weight
};
// Open loop: every scenario's own arrival process, merged by time; then the limits.
// Closed loop: max_requests requests (required), scenarios drawn by weight.
StatusOr<std::vector<PlannedRequest>> plan_synthetic(const std::vector<Scenario>& scenarios,
                                                     const PlanOptions& options);

struct TraceReplayOptions {
  double speedup = 1;      // arrival times divided by this
  double input_scale = 1;  // lengths multiplied by these (rounded, >= 1)
  double output_scale = 1;
  double start_s = 0;            // skip the trace before this time (trace seconds)
  int32_t max_input_tokens = 0;  // clamp (0: none)
  int32_t max_output_tokens = 0;
  int64_t max_requests = 0;  // <= 0: unlimited
  double duration_s = 0;     // of the replay (after speedup); <= 0: unlimited
  uint64_t seed = 0;
};
StatusOr<std::vector<PlannedRequest>> plan_trace(const std::vector<TraceRecord>& trace,
                                                 const TraceReplayOptions& options);

}  // namespace pdserve::bench
