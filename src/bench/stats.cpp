#include "bench/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace pdserve::bench {

double RequestRecord::tpot_s() const {
  if (output_tokens < 2 || first_token_s < 0 || end_s < 0) return -1;
  return (end_s - first_token_s) / (output_tokens - 1);
}

double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  double pos = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(pos));
  size_t hi = std::min(lo + 1, sorted.size() - 1);
  double frac = pos - static_cast<double>(lo);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

LatencyStats latency_stats(std::vector<double> values) {
  LatencyStats s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = static_cast<int64_t>(values.size());
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  s.min = values.front();
  s.max = values.back();
  s.p50 = percentile(values, 50);
  s.p90 = percentile(values, 90);
  s.p99 = percentile(values, 99);
  return s;
}

double SloSpec::ttft_objective_ms(const RequestRecord& r) const {
  if (ttft_ms <= 0) return 0;
  const int32_t tokens = r.prompt_tokens >= 0 ? r.prompt_tokens : r.planned_input_tokens;
  return ttft_ms + ttft_ms_per_token * tokens;
}

bool meets_ttft(const RequestRecord& r, const SloSpec& slo) {
  if (!r.ok()) return false;
  if (slo.ttft_ms <= 0) return true;
  double t = r.ttft_s();
  return t >= 0 && t * 1e3 <= slo.ttft_objective_ms(r);
}

bool meets_tpot(const RequestRecord& r, const SloSpec& slo) {
  if (!r.ok()) return false;
  if (slo.tpot_ms <= 0) return true;
  double t = r.tpot_s();
  return t < 0 || t * 1e3 <= slo.tpot_ms;
}

Summary summarize(const std::vector<RequestRecord>& records, const SloSpec& slo) {
  Summary s;
  s.slo = slo;
  std::vector<double> ttft, tpot, itl, e2e, lag;
  double first_send = std::numeric_limits<double>::infinity();
  double last_end = -std::numeric_limits<double>::infinity();
  int64_t ttft_met = 0, tpot_met = 0, both_met = 0;
  for (const RequestRecord& r : records) {
    if (!r.sent()) {
      ++s.num_not_sent;
      continue;
    }
    if (r.cancelled()) {
      ++s.num_cancelled;
      continue;
    }
    ++s.num_requests;
    if (r.send_s >= 0) {
      first_send = std::min(first_send, r.send_s);
      lag.push_back((r.send_s - r.scheduled_s) * 1e3);
    }
    if (r.end_s >= 0) last_end = std::max(last_end, r.end_s);
    bool mt = meets_ttft(r, slo), mp = meets_tpot(r, slo);
    ttft_met += mt;
    tpot_met += mp;
    both_met += mt && mp;
    if (!r.ok()) {
      ++s.num_errors;
      ++s.errors_by_type[r.error];
      continue;
    }
    ++s.num_ok;
    s.input_tokens += r.prompt_tokens >= 0 ? r.prompt_tokens : r.planned_input_tokens;
    s.output_tokens += r.output_tokens;
    if (r.usage_reported && r.output_tokens != r.num_chunks) ++s.usage_mismatches;
    if (r.ttft_s() >= 0) ttft.push_back(r.ttft_s() * 1e3);
    if (r.tpot_s() >= 0) tpot.push_back(r.tpot_s() * 1e3);
    if (r.e2e_s() >= 0) e2e.push_back(r.e2e_s() * 1e3);
    for (size_t i = 1; i < r.chunk_s.size(); ++i) itl.push_back((r.chunk_s[i] - r.chunk_s[i - 1]) * 1e3);
  }
  if (s.num_requests > 0 && last_end > first_send) s.duration_s = last_end - first_send;
  if (s.duration_s > 0) {
    s.requests_per_s = static_cast<double>(s.num_ok) / s.duration_s;
    s.output_tokens_per_s = static_cast<double>(s.output_tokens) / s.duration_s;
    s.total_tokens_per_s = static_cast<double>(s.output_tokens + s.input_tokens) / s.duration_s;
    s.goodput_rps = static_cast<double>(both_met) / s.duration_s;
  }
  if (s.num_requests > 0) {
    double n = static_cast<double>(s.num_requests);
    s.ttft_attainment = static_cast<double>(ttft_met) / n;
    s.tpot_attainment = static_cast<double>(tpot_met) / n;
    s.slo_attainment = static_cast<double>(both_met) / n;
  }
  s.ttft_ms = latency_stats(std::move(ttft));
  s.tpot_ms = latency_stats(std::move(tpot));
  s.itl_ms = latency_stats(std::move(itl));
  s.e2e_ms = latency_stats(std::move(e2e));
  s.send_lag_ms = latency_stats(std::move(lag));
  return s;
}

std::vector<RequestRecord> records_of_scenario(const std::vector<RequestRecord>& records,
                                               int32_t scenario_idx) {
  std::vector<RequestRecord> out;
  for (const RequestRecord& r : records) {
    if (r.scenario_idx == scenario_idx) out.push_back(r);
  }
  return out;
}

}  // namespace pdserve::bench
