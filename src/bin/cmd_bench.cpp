// `pdserve bench`: the load generator. Builds a workload (synthetic scenarios or a trace
// replay), sends it to any OpenAI-compatible server with streamed completions, and reports
// latency, throughput, SLO attainment, goodput and the server's metric deltas (table + JSON).
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <sstream>

#include "bench/client.h"
#include "bench/prompt.h"
#include "bench/report.h"
#include "bench/workload.h"
#include "bin/commands.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {

namespace {

using namespace bench;

std::atomic<bool> g_stop{false};
const CLI::Option* g_num_requests_option = nullptr;

extern "C" void on_sigint(int) {
  if (g_stop.load()) std::_Exit(130);  // a second Ctrl-C: leave at once
  g_stop.store(true);
}

struct BenchArgs {
  std::string base_url = "http://127.0.0.1:8000";
  std::string api = "completions";
  std::string model;
  std::string api_key;
  // workload
  std::string input_len = "normal:256:64";
  std::string output_len = "fixed:64";
  std::string arrival = "poisson";
  double rate = 1;
  double cv = 2;
  double tidal_period_s = 600;
  int32_t users = 8;
  int64_t num_requests = 100;
  double duration_s = 0;
  std::string system_prompt;
  int32_t system_tokens = 0;
  std::string scenarios;
  uint64_t seed = 1;
  // trace
  std::string trace;
  double trace_speedup = 1;
  double trace_input_scale = 1;
  double trace_output_scale = 1;
  double trace_start_s = 0;
  int32_t block_tokens = 512;
  int32_t max_input_tokens = 0;
  int32_t max_output_tokens = 0;
  // prompts and bodies
  std::string tokenizer_model;
  bool no_server_tokenize = false;
  bool ignore_eos = true;
  double temperature = 0;
  bool no_usage = false;
  bool no_metadata = false;
  std::string extra_body;
  // client
  int32_t client_threads = 1;
  int32_t max_in_flight = 0;
  double timeout_s = 300;
  bool no_keep_alive = false;
  // measures and output
  double slo_ttft_ms = 0;
  double slo_ttft_ms_per_token = 0;
  double slo_tpot_ms = 0;
  bool no_metrics = false;
  double metrics_interval_s = 0;
  std::string json_path;
  bool no_chunk_times = false;
  bool quiet = false;
  std::vector<double> sweep_rates;
  std::vector<double> sweep_search;
  int32_t sweep_steps = 6;
  double sweep_target = 0.9;
  std::string ab_base_url;
  int32_t ab_rounds = 2;
};

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string read_arg_or_file(const std::string& v) {
  if (v.empty() || v[0] != '@') return v;
  std::ifstream in(v.substr(1));
  if (!in) return "";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The token counter: a local GGUF tokenizer, the server's /tokenize, or words.
struct Counter {
  std::unique_ptr<GgufFile> gguf;
  std::unique_ptr<Tokenizer> tokenizer;
  TokenCounter fn;
  std::string how;
};

StatusOr<Counter> make_counter(const BenchArgs& a, const LoadClient& client) {
  Counter c;
  if (!a.tokenizer_model.empty()) {
    PD_ASSIGN_OR_RETURN(c.gguf, GgufFile::open(a.tokenizer_model));
    PD_ASSIGN_OR_RETURN(auto tok, Tokenizer::from_gguf(*c.gguf));
    c.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
    const Tokenizer* t = c.tokenizer.get();
    c.fn = [t](const std::string& text) -> StatusOr<int32_t> {
      return static_cast<int32_t>(t->encode(text, /*add_special=*/true, /*parse_special=*/false).size());
    };
    c.how = "tokenizer of " + a.tokenizer_model;
    return c;
  }
  if (!a.no_server_tokenize) {
    auto probe = client.post_json("/tokenize", R"({"content": "hello world"})", 10);
    if (probe.ok() && probe->status == 200 && tokenize_count(probe->body).ok()) {
      const LoadClient* cl = &client;
      c.fn = [cl](const std::string& text) -> StatusOr<int32_t> {
        PD_ASSIGN_OR_RETURN(HttpResult r, cl->post_json("/tokenize", tokenize_request_body(text), 60));
        if (r.status != 200)
          return unavailable(fmt::format("POST /tokenize: HTTP {}: {}", r.status, r.body.substr(0, 200)));
        return tokenize_count(r.body);
      };
      c.how = "the server's /tokenize";
      return c;
    }
    fmt::print(stderr,
               "[bench] warning: the server has no usable POST /tokenize ({}); prompt lengths are "
               "approximate (one pool word ~ one token). Give --tokenizer-model for exact lengths.\n",
               probe.ok() ? fmt::format("HTTP {}", probe->status) : probe.status().message());
  }
  c.fn = count_words;
  c.how = "word count (approximate)";
  return c;
}

// The workload shared by every run: scenarios (synthetic) or the trace.
struct Workload {
  std::vector<Scenario> scenarios;
  std::vector<TraceRecord> trace;
  bool closed_loop = false;
  std::string description;
};

StatusOr<Workload> make_workload(const BenchArgs& a) {
  Workload w;
  w.closed_loop = a.arrival == "closed";
  Scenario d;
  d.system_prompt = a.system_prompt;
  d.system_prompt_tokens = a.system_tokens;
  PD_ASSIGN_OR_RETURN(d.input, parse_length_dist(a.input_len));
  PD_ASSIGN_OR_RETURN(d.output, parse_length_dist(a.output_len));
  if (!w.closed_loop) {
    PD_ASSIGN_OR_RETURN(d.arrival.kind, parse_arrival_kind(a.arrival));
  }
  d.arrival.rate_rps = a.rate;
  d.arrival.cv = a.cv;
  d.arrival.period_s = a.tidal_period_s;
  if (!a.trace.empty()) {
    if (!a.scenarios.empty()) return invalid_argument("--trace and --scenarios cannot be combined");
    PD_ASSIGN_OR_RETURN(w.trace, load_trace(a.trace));
    d.name = "trace";
    w.scenarios.push_back(d);
    w.description = fmt::format("trace {} ({} requests), speedup {}, input x{}, output x{}{}", a.trace,
                                w.trace.size(), a.trace_speedup, a.trace_input_scale, a.trace_output_scale,
                                w.closed_loop ? fmt::format(", closed loop {} users", a.users) : "");
    return w;
  }
  if (!a.scenarios.empty()) {
    std::string text = read_arg_or_file(a.scenarios);
    if (text.empty()) return invalid_argument(fmt::format("--scenarios: cannot read '{}'", a.scenarios));
    PD_ASSIGN_OR_RETURN(w.scenarios, parse_scenarios(text, d));
  } else {
    w.scenarios.push_back(d);
  }
  std::string parts;
  for (const Scenario& s : w.scenarios) {
    parts +=
        fmt::format("{}[{}in {} out {}{}] ", s.name, w.closed_loop ? "" : s.arrival.to_string() + ", ",
                    s.input.to_string(), s.output.to_string(),
                    s.system_prompt_tokens ? fmt::format(", system {} tok", s.system_prompt_tokens) : "");
  }
  w.description = w.closed_loop ? fmt::format("closed loop, {} users: {}", a.users, parts) : parts;
  return w;
}

StatusOr<std::vector<PlannedRequest>> plan_run(const BenchArgs& a, const Workload& w, double rate_factor) {
  if (!w.trace.empty()) {
    TraceReplayOptions o;
    o.speedup = a.trace_speedup * rate_factor;
    o.input_scale = a.trace_input_scale;
    o.output_scale = a.trace_output_scale;
    o.start_s = a.trace_start_s;
    o.max_input_tokens = a.max_input_tokens;
    o.max_output_tokens = a.max_output_tokens;
    o.max_requests = a.num_requests;
    o.duration_s = w.closed_loop ? 0 : a.duration_s;
    o.seed = a.seed;
    return plan_trace(w.trace, o);
  }
  std::vector<Scenario> scenarios = w.scenarios;
  for (Scenario& s : scenarios) s.arrival.rate_rps *= rate_factor;
  PlanOptions o;
  o.max_requests = a.num_requests;
  o.duration_s = w.closed_loop ? 0 : a.duration_s;
  o.seed = a.seed;
  o.closed_loop = w.closed_loop;
  PD_ASSIGN_OR_RETURN(auto plan, plan_synthetic(scenarios, o));
  for (PlannedRequest& r : plan) {
    r.input_tokens = a.max_input_tokens > 0 ? std::min(r.input_tokens, a.max_input_tokens) : r.input_tokens;
    r.output_tokens =
        a.max_output_tokens > 0 ? std::min(r.output_tokens, a.max_output_tokens) : r.output_tokens;
  }
  return plan;
}

// Each stream holds a socket: raise the soft limit on open files to the hard one.
void raise_file_limit() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

int run_bench(void* p) {
  auto& a = *static_cast<BenchArgs*>(p);
  raise_file_limit();
  auto fail = [](const Status& s) {
    fmt::print(stderr, "error: {}\n", s.message());
    return 2;
  };
  if (a.api_key.empty()) {
    if (const char* k = std::getenv("PDSERVE_API_KEY"); k && *k) a.api_key = k;
  }
  // One URL, or several comma-separated (gateways of one deployment, taking requests in turn).
  auto parse_urls = [&](const std::string& list) -> StatusOr<std::vector<Endpoint>> {
    std::vector<Endpoint> out;
    size_t from = 0;
    for (;;) {
      const size_t comma = list.find(',', from);
      auto e = parse_base_url(
          std::string_view(list).substr(from, comma == std::string::npos ? comma : comma - from));
      if (!e.ok()) return e.status();
      e->api_key = a.api_key;
      out.push_back(std::move(*e));
      if (comma == std::string::npos) return out;
      from = comma + 1;
    }
  };
  auto endpoint = parse_urls(a.base_url);
  if (!endpoint.ok()) return fail(endpoint.status());
  if (a.api != "completions" && a.api != "chat") return fail(invalid_argument("--api: completions or chat"));
  if (a.rate <= 0 || a.cv <= 0 || a.tidal_period_s <= 0)
    return fail(invalid_argument("--rate, --burstiness-cv and --tidal-period must be > 0"));
  if (a.arrival == "closed" && a.num_requests <= 0)
    return fail(invalid_argument("closed loop needs --num-requests > 0"));
  if (a.duration_s > 0 && a.arrival != "closed" && g_num_requests_option &&
      g_num_requests_option->count() == 0) {
    a.num_requests = 0;  // --duration alone bounds an open-loop run
  }
  if (a.num_requests <= 0 && a.duration_s <= 0 && a.trace.empty()) {
    return fail(invalid_argument("give --num-requests or --duration"));
  }
  auto workload = make_workload(a);
  if (!workload.ok()) return fail(workload.status());
  const bool searching = !a.sweep_search.empty();
  if (searching) {
    if (a.sweep_search.size() != 2 || a.sweep_search[0] <= 0 || a.sweep_search[1] <= a.sweep_search[0]) {
      return fail(invalid_argument("--sweep-search: expected LOW,HIGH with 0 < LOW < HIGH"));
    }
    if (!a.sweep_rates.empty())
      return fail(invalid_argument("--sweep-search and --sweep-rates cannot be combined"));
    if (a.slo_ttft_ms <= 0 && a.slo_tpot_ms <= 0) {
      return fail(invalid_argument("--sweep-search needs --slo-ttft-ms and/or --slo-tpot-ms"));
    }
  }
  if ((!a.sweep_rates.empty() || searching) && workload->closed_loop)
    return fail(invalid_argument("--sweep-rates and --sweep-search need an open-loop arrival process"));
  auto client_or = LoadClient::create(*endpoint);
  if (!client_or.ok()) return fail(client_or.status());
  LoadClient& client = **client_or;

  BodyOptions body;
  body.api = a.api == "chat" ? Api::kChat : Api::kCompletions;
  body.model = a.model;
  body.ignore_eos = a.ignore_eos;
  body.include_usage = !a.no_usage;
  body.temperature = a.temperature;
  body.scenario_metadata = !a.no_metadata;
  body.extra_json = a.extra_body;
  if (Status s = validate_body_options(body); !s.ok()) return fail(s);
  // The model to name: --model, else the first of the server's GET /v1/models.
  auto model_of = [&](const LoadClient& c) -> StatusOr<std::string> {
    if (!a.model.empty()) return a.model;
    auto models = c.get("/v1/models");
    if (!models.ok()) return models.status().with_context("cannot reach the server");
    auto id = models->status == 200
                  ? first_model_id(models->body)
                  : StatusOr<std::string>(invalid_argument(fmt::format("HTTP {}", models->status)));
    if (id.ok()) return *id;
    fmt::print(stderr, "[bench] warning: GET /v1/models of {}:{}: {}; sending no \"model\" (give --model)\n",
               c.endpoint().host, c.endpoint().port, id.status().message());
    return std::string();
  };
  auto model_a = model_of(client);
  if (!model_a.ok()) return fail(model_a.status());
  body.model = *model_a;
  // A/B: the second server, its model.
  std::unique_ptr<LoadClient> client_b;
  std::string model_b;
  if (!a.ab_base_url.empty()) {
    if (!a.sweep_rates.empty() || searching)
      return fail(invalid_argument("--ab-base-url cannot be combined with a sweep"));
    auto eb = parse_urls(a.ab_base_url);
    if (!eb.ok()) return fail(eb.status().with_context("--ab-base-url"));
    auto cb = LoadClient::create(*eb);
    if (!cb.ok()) return fail(cb.status());
    client_b = std::move(*cb);
    auto mb = model_of(*client_b);
    if (!mb.ok()) return fail(mb.status().with_context("--ab-base-url"));
    model_b = *mb;
  }
  auto counter = make_counter(a, client);
  if (!counter.ok()) return fail(counter.status());
  int32_t block_tokens =
      std::max<int32_t>(1, static_cast<int32_t>(std::lround(a.block_tokens * a.trace_input_scale)));
  PromptBuilder builder(counter->fn, block_tokens);

  // System prompts, one per scenario.
  std::vector<std::string> systems;
  for (const Scenario& s : workload->scenarios) {
    if (s.system_prompt_tokens > 0) {
      auto sp = builder.system_prompt(s.name, s.system_prompt_tokens);
      if (!sp.ok()) return fail(sp.status());
      systems.push_back(*sp);
    } else {
      systems.push_back(s.system_prompt);
    }
  }

  Report report;
  {
    std::ifstream in("/proc/self/cmdline", std::ios::binary);
    std::string arg;
    while (std::getline(in, arg, '\0')) report.command_line += (report.command_line.empty() ? "" : " ") + arg;
  }
  report.base_url = a.base_url;
  report.api = a.api;
  report.model = body.model;
  report.workload = workload->description;
  report.date_utc = utc_now();
  report.save_chunk_times = !a.no_chunk_times;
  for (const Scenario& s : workload->scenarios) report.scenarios.push_back(s.name);
  fmt::print(stderr, "[bench] {} {} model '{}'; prompts counted by {}\n[bench] workload: {}\n", a.base_url,
             a.api == "chat" ? "/v1/chat/completions" : "/v1/completions", body.model, counter->how,
             workload->description);

  std::signal(SIGINT, on_sigint);
  std::signal(SIGTERM, on_sigint);
  const bool tty = isatty(fileno(stderr));
  // The runs: one; one per sweep rate; or A/B rounds (A B, then B A, ...) on the same requests.
  struct RunSpec {
    double factor = 1;
    double rate_rps = 0;
    int side = 0;  // 0: --base-url, 1: --ab-base-url
    std::string label;
  };
  std::vector<RunSpec> specs;
  double base_rate = 0;
  for (const Scenario& s : workload->scenarios) base_rate += s.arrival.rate_rps;
  auto rate_spec = [&](double r) -> RunSpec {
    return {workload->trace.empty() ? r / base_rate : r, r, 0,
            workload->trace.empty() ? fmt::format("rate {:g} req/s", r)
                                    : fmt::format("trace speedup x{:g}", a.trace_speedup * r)};
  };
  // --sweep-search: the low and high rates first, then bisection (geometric) between the highest
  // rate that met the target and the lowest that missed it.
  double search_ok = 0, search_miss = 0;
  if (searching) {
    specs.push_back(rate_spec(a.sweep_search[0]));
    specs.push_back(rate_spec(a.sweep_search[1]));
  } else if (!a.sweep_rates.empty()) {
    for (double r : a.sweep_rates) specs.push_back(rate_spec(r));
  } else if (client_b) {
    for (int32_t round = 1; round <= std::max(1, a.ab_rounds); ++round) {
      for (int k = 0; k < 2; ++k) {
        int side = round % 2 == 1 ? k : 1 - k;
        specs.push_back({1, 0, side, fmt::format("{} round {}", side == 0 ? "A" : "B", round)});
      }
    }
  } else {
    specs.push_back({1, 0, 0, "run"});
  }
  // Prompts of the last plan (A/B runs share them).
  double prompts_factor = -1;
  std::vector<std::pair<PlannedRequest, BuiltPrompt>> prompts;
  for (size_t run_idx = 0; run_idx < specs.size() && !g_stop.load(); ++run_idx) {
    const RunSpec& spec = specs[run_idx];
    LoadClient& client_x = spec.side == 0 ? client : *client_b;
    RunResult result;
    result.rate_rps = spec.rate_rps;
    result.label = spec.label;
    if (spec.factor != prompts_factor) {
      prompts.clear();
      auto plan = plan_run(a, *workload, spec.factor);
      if (!plan.ok()) return fail(plan.status());
      auto t0 = std::chrono::steady_clock::now();
      int64_t inexact = 0;
      for (const PlannedRequest& r : *plan) {
        if (g_stop.load()) break;
        auto prompt = builder.build(systems[r.scenario_idx], r);
        if (!prompt.ok()) return fail(prompt.status().with_context(fmt::format("request {}", r.id)));
        inexact += !prompt->exact;
        prompts.emplace_back(r, std::move(*prompt));
      }
      if (g_stop.load()) break;
      prompts_factor = spec.factor;
      fmt::print(stderr, "[bench] {}: {} requests planned, prompts built in {:.2f} s{}\n", result.label,
                 prompts.size(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                 inexact ? fmt::format(" ({} not of the exact length)", inexact) : "");
    }
    BodyOptions body_x = body;
    body_x.model = spec.side == 0 ? body.model : model_b;
    std::vector<PreparedRequest> prepared;
    for (const auto& [r, prompt] : prompts) {
      PreparedRequest pr;
      pr.id = r.id;
      pr.arrival_s = r.arrival_s;
      pr.scenario_idx = r.scenario_idx;
      pr.scenario = workload->scenarios[r.scenario_idx].name;
      pr.path = body.api == Api::kChat ? "/v1/chat/completions" : "/v1/completions";
      pr.body = make_request_body(body_x, prompt, r.output_tokens, pr.scenario);
      pr.planned_input_tokens = prompt.tokens;
      pr.planned_output_tokens = r.output_tokens;
      prepared.push_back(std::move(pr));
    }

    std::map<std::string, double> metrics_before;
    // Every server's /metrics, summed series by series (several gateways of one deployment).
    auto scrape = [&]() -> std::optional<std::map<std::string, double>> {
      if (a.no_metrics) return std::nullopt;
      std::map<std::string, double> sum;
      for (size_t i = 0; i < client_x.num_endpoints(); ++i) {
        auto m = client_x.get_from(i, "/metrics", 5);
        if (!m.ok() || m->status != 200) return std::nullopt;
        for (const auto& [name, value] : parse_prometheus_text(m->body)) sum[name] += value;
      }
      return sum;
    };
    auto before = scrape();
    RunOptions ro;
    ro.closed_loop = workload->closed_loop;
    ro.users = a.users;
    ro.duration_s = a.duration_s;
    ro.max_in_flight = a.max_in_flight;
    ro.client_threads = a.client_threads;
    ro.timeout_s = a.timeout_s;
    ro.keep_alive = !a.no_keep_alive;
    ro.save_chunk_times = true;
    const int64_t total = static_cast<int64_t>(prepared.size());
    double last_line_s = -1e9, last_scrape_s = 0;
    int64_t last_finished = 0, last_chunks = 0;
    double last_t = 0;
    auto on_tick = [&](const Progress& pr, double t) {
      if (a.metrics_interval_s > 0 && t - last_scrape_s >= a.metrics_interval_s) {
        last_scrape_s = t;
        if (auto m = scrape()) result.metrics_series.push_back({t, std::move(*m)});
      }
      if (a.quiet || (!tty && t - last_line_s < 10)) return;
      double dt = std::max(t - last_t, 1e-9);
      std::string line = fmt::format(
          "[bench] {:7.1f} s | sent {}/{} | done {} | in flight {} | errors {} | {:.1f} req/s | {:.0f} tok/s",
          t, pr.started, total, pr.finished, pr.started - pr.finished, pr.errors,
          (pr.finished - last_finished) / dt, (pr.output_chunks - last_chunks) / dt);
      if (tty) {
        fmt::print(stderr, "\r{}\x1b[K", line);
      } else {
        fmt::print(stderr, "{}\n", line);
      }
      last_line_s = t;
      last_finished = pr.finished;
      last_chunks = pr.output_chunks;
      last_t = t;
    };
    result.records = client_x.run(prepared, ro, g_stop, on_tick, 1.0);
    if (tty && !a.quiet) fmt::print(stderr, "\n");
    auto after = scrape();
    if (before && after) result.metric_deltas = counter_deltas(*before, *after);
    SloSpec slo{
        .ttft_ms = a.slo_ttft_ms, .tpot_ms = a.slo_tpot_ms, .ttft_ms_per_token = a.slo_ttft_ms_per_token};
    result.summary = summarize(result.records, slo);
    if (workload->scenarios.size() > 1) {
      for (size_t k = 0; k < workload->scenarios.size(); ++k) {
        result.per_scenario.emplace_back(
            workload->scenarios[k].name,
            summarize(records_of_scenario(result.records, static_cast<int32_t>(k)), slo));
      }
    }
    std::string title = g_stop.load() ? result.label + " (interrupted: partial results)" : result.label;
    std::fputs(format_summary(result.summary, title).c_str(), stdout);
    for (const auto& [name, s] : result.per_scenario) {
      std::fputs(format_summary(s, fmt::format("{} / scenario {}", result.label, name)).c_str(), stdout);
    }
    if (!result.metric_deltas.empty()) {
      const size_t servers = (spec.side == 0 ? client : *client_b).num_endpoints();
      const std::string heading =
          servers > 1
              ? fmt::format("  server metrics (change during the run, summed over {} servers):\n", servers)
              : std::string("  server metrics (change during the run):\n");
      std::fputs(heading.c_str(), stdout);
      std::fputs(format_metric_deltas(result.metric_deltas, 30).c_str(), stdout);
    }
    std::fflush(stdout);
    report.runs.push_back(std::move(result));
    if (searching && !g_stop.load()) {
      const RunResult& last = report.runs.back();
      if (last.summary.slo_attainment >= a.sweep_target) {
        search_ok = std::max(search_ok, last.rate_rps);
      } else if (search_miss == 0 || last.rate_rps < search_miss) {
        search_miss = last.rate_rps;
      }
      if (run_idx == 0 && search_ok == 0) {
        specs.resize(1);  // even the low rate misses the target
      } else if (run_idx >= 1 && search_ok > 0 && search_miss > 0 &&
                 static_cast<int32_t>(specs.size()) < std::max(2, a.sweep_steps) &&
                 run_idx + 1 == specs.size()) {
        specs.push_back(rate_spec(std::sqrt(search_ok * search_miss)));
      }
    }
  }
  if (client_b) {
    std::fputs(format_ab_table(report.runs).c_str(), stdout);
  } else if (report.runs.size() > 1 || !a.sweep_rates.empty() || searching) {
    std::fputs("==== sweep ====\n", stdout);
    std::fputs(format_sweep_table(report.runs).c_str(), stdout);
    if (a.slo_ttft_ms > 0 || a.slo_tpot_ms > 0) {
      double best = 0;
      for (const RunResult& r : report.runs) {
        if (r.summary.slo_attainment >= a.sweep_target) best = std::max(best, r.rate_rps);
      }
      if (best > 0) {
        fmt::print("highest rate with SLO attainment >= {:g} %: {:g} req/s\n", a.sweep_target * 100, best);
      } else {
        fmt::print("no rate reached SLO attainment >= {:g} %\n", a.sweep_target * 100);
      }
      if (searching && search_ok > 0 && search_miss > 0) {
        fmt::print("search bracket: met at {:g}, missed at {:g} req/s\n", search_ok, search_miss);
      }
    }
  }
  if (!a.json_path.empty()) {
    if (Status s = write_json_report(a.json_path, report); !s.ok()) return fail(s);
    fmt::print(stderr, "[bench] wrote {}\n", a.json_path);
  }
  if (g_stop.load()) return 130;
  for (const RunResult& r : report.runs) {
    if (r.summary.num_errors > 0) return 1;
  }
  return 0;
}

}  // namespace

void register_bench_command(CLI::App& app) {
  static BenchArgs a;
  CLI::App* cmd = app.add_subcommand("bench",
                                     "Load generator: sends a workload (synthetic scenarios or a replayed "
                                     "trace) to an OpenAI-compatible server with "
                                     "streamed completions and reports TTFT, TPOT, inter-token latency, E2E "
                                     "latency, throughput, SLO attainment, "
                                     "goodput, errors and the server's /metrics deltas. Exit code: 0 all "
                                     "requests succeeded, 1 some failed, 2 bad "
                                     "arguments or unreachable server, 130 interrupted (Ctrl-C prints the "
                                     "partial report; a second Ctrl-C quits).");
  cmd->option_defaults()->always_capture_default();
  auto* g = "Target";
  cmd->add_option(
         "--base-url", a.base_url,
         "Server URL http://HOST[:PORT][/PATH] (routes are appended); several, comma-separated, take "
         "the requests in turn (gateways of one deployment; the model and tokenizer are read from the first, "
         "/metrics from all, summed)")
      ->group(g);
  cmd->add_option("--api", a.api, "completions (/v1/completions, prompt text) or chat (/v1/chat/completions)")
      ->check(CLI::IsMember({"completions", "chat"}))
      ->group(g);
  cmd->add_option("--model", a.model, "The request's \"model\" (default: the first id of GET /v1/models)")
      ->group(g);
  cmd->add_option("--api-key", a.api_key, "Sent as 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)")
      ->group(g);

  g = "Workload (synthetic)";
  cmd->add_option("--input-len", a.input_len,
                  "Prompt tokens: N | fixed:N | uniform:MIN:MAX | normal:MEAN:STDDEV")
      ->group(g);
  cmd->add_option("--output-len", a.output_len, "Output tokens (max_tokens), same syntax")->group(g);
  cmd->add_option(
         "--arrival", a.arrival,
         "poisson | gamma (bursty, see --burstiness-cv) | tidal (a daily curve compressed into "
         "--tidal-period) | constant | closed (--users users, each sends its next request when its last "
         "completes)")
      ->check(CLI::IsMember({"poisson", "gamma", "tidal", "constant", "closed"}))
      ->group(g);
  cmd->add_option("--rate", a.rate, "Mean requests per second (open loop)")->group(g);
  cmd->add_option("--burstiness-cv", a.cv,
                  "gamma: coefficient of variation of inter-arrival times (1 = Poisson)")
      ->group(g);
  cmd->add_option("--tidal-period", a.tidal_period_s, "tidal: seconds one day lasts")->group(g);
  cmd->add_option("--users", a.users, "closed: concurrent users")->group(g);
  g_num_requests_option =
      cmd->add_option(
             "-n,--num-requests", a.num_requests,
             "Requests to send (0: no limit; an open-loop run with --duration and no -n is bounded by the "
             "duration alone; a closed loop always needs it)")
          ->group(g);
  cmd->add_option("--duration", a.duration_s,
                  "Seconds of arrivals (open loop) or of sending (closed loop); 0: none")
      ->group(g);
  cmd->add_option("--system-prompt", a.system_prompt, "System prompt text (a shared prefix)")->group(g);
  cmd->add_option("--system-tokens", a.system_tokens, "A generated system prompt of this many tokens")
      ->group(g);
  cmd->add_option(
         "--scenarios", a.scenarios,
         "A scenario mix: JSON (or @FILE): [{\"name\", \"rate\", \"arrival\", \"cv\", \"period_s\", "
         "\"curve\", "
         "\"input\", \"output\", \"system_prompt\" or \"system_tokens\", \"weight\"}, ...]; missing fields "
         "take the flags' values; see docs/perf/bench.md")
      ->group(g);
  cmd->add_option("--seed", a.seed, "Seed of arrivals, lengths and prompt words")->group(g);

  g = "Workload (trace replay)";
  cmd->add_option(
         "--trace", a.trace,
         "Replay a trace: Mooncake JSONL (.jsonl) or Azure CSV (.csv); the project's traces are in the "
         "planning repository's traces/ folder")
      ->group(g);
  cmd->add_option("--trace-speedup", a.trace_speedup, "Divide the trace's inter-arrival times by this")
      ->group(g);
  cmd->add_option("--trace-input-scale", a.trace_input_scale,
                  "Multiply the trace's input lengths (and the block size)")
      ->group(g);
  cmd->add_option("--trace-output-scale", a.trace_output_scale, "Multiply the trace's output lengths")
      ->group(g);
  cmd->add_option("--trace-start", a.trace_start_s, "Skip the trace's first seconds")->group(g);
  cmd->add_option("--block-tokens", a.block_tokens,
                  "Tokens per Mooncake hash id (requests sharing ids share these prefix tokens)")
      ->group(g);
  cmd->add_option("--max-input-tokens", a.max_input_tokens, "Clamp prompt lengths (0: no clamp)")->group(g);
  cmd->add_option("--max-output-tokens", a.max_output_tokens, "Clamp output lengths (0: no clamp)")->group(g);

  g = "Requests";
  cmd->add_option(
         "--tokenizer-model", a.tokenizer_model,
         "Count prompt tokens with this GGUF model's tokenizer (default: the server's POST /tokenize)")
      ->group(g);
  cmd->add_flag("--no-server-tokenize", a.no_server_tokenize,
                "Do not use /tokenize: one pool word counts as one token (approximate)")
      ->group(g);
  cmd->add_flag("--ignore-eos,!--no-ignore-eos", a.ignore_eos,
                "Send \"ignore_eos\": true so the server honours the output lengths")
      ->group(g);
  cmd->add_option("--temperature", a.temperature, "Sampling temperature")->group(g);
  cmd->add_flag("--no-usage", a.no_usage,
                "Do not ask for stream_options.include_usage (tokens are then counted as chunks)")
      ->group(g);
  cmd->add_flag("--no-metadata", a.no_metadata,
                "Do not send metadata.scenario (the X-Scenario header is always sent)")
      ->group(g);
  cmd->add_option("--extra-body", a.extra_body, "A JSON object merged into every request body")->group(g);

  g = "Client";
  cmd->add_option("--client-threads", a.client_threads, "Event-loop threads of the client")
      ->check(CLI::Range(1, 256))
      ->group(g);
  cmd->add_option(
         "--max-in-flight", a.max_in_flight,
         "Open loop: at most this many requests at once (0: no cap); later ones wait and show as send lag")
      ->group(g);
  cmd->add_option("--timeout", a.timeout_s, "A request fails when no byte arrives for this many seconds")
      ->group(g);
  cmd->add_flag("--no-keep-alive", a.no_keep_alive, "A new connection for every request")->group(g);

  g = "Measures and output";
  cmd->add_option("--slo-ttft-ms", a.slo_ttft_ms, "TTFT objective in ms (0: none)")->group(g);
  cmd->add_option("--slo-ttft-ms-per-token", a.slo_ttft_ms_per_token,
                  "Added to the TTFT objective per prompt token (an objective that grows with the prompt)")
      ->check(CLI::Range(0.0, 1000.0))
      ->group(g);
  cmd->add_option("--slo-tpot-ms", a.slo_tpot_ms, "TPOT objective in ms (0: none)")->group(g);
  cmd->add_flag("--no-metrics", a.no_metrics, "Do not scrape the server's GET /metrics")->group(g);
  cmd->add_option("--metrics-interval", a.metrics_interval_s,
                  "Also scrape /metrics every this many seconds (0: start and end only)")
      ->group(g);
  cmd->add_option(
         "--json", a.json_path,
         "Write every request's record and the summaries to this JSON file (tools/bench/plot.py plots it)")
      ->group(g);
  cmd->add_flag("--no-chunk-times", a.no_chunk_times, "Leave each chunk's arrival time out of the JSON")
      ->group(g);
  cmd->add_flag("-q,--quiet", a.quiet, "No progress line")->group(g);
  cmd->add_option(
         "--sweep-rates", a.sweep_rates,
         "Run the workload once per total rate (comma-separated req/s; for a trace: speedup factors) and "
         "print a table")
      ->delimiter(',')
      ->group(g);
  cmd->add_option(
         "--sweep-search", a.sweep_search,
         "Search the highest rate meeting the SLO: LOW,HIGH req/s (for a trace: speedups); runs LOW, "
         "HIGH, then bisects (geometric mean) for --sweep-steps runs in all")
      ->delimiter(',')
      ->expected(2)
      ->group(g);
  cmd->add_option("--sweep-steps", a.sweep_steps, "Sweep search: runs in all")
      ->check(CLI::Range(2, 50))
      ->group(g);
  cmd->add_option("--sweep-target", a.sweep_target,
                  "Sweep: report the highest rate whose SLO attainment is at least this")
      ->group(g);
  g = "A/B comparison";
  cmd->add_option(
         "--ab-base-url", a.ab_base_url,
         "Compare with a second server: the same requests run on --base-url (A) and on this one (B), "
         "alternating A B, B A, ... for --ab-rounds rounds; prints B/A ratios (several URLs, "
         "comma-separated, "
         "as for --base-url)")
      ->group(g);
  cmd->add_option("--ab-rounds", a.ab_rounds, "A/B: rounds (each runs the workload once on each server)")
      ->check(CLI::Range(1, 100))
      ->group(g);
  cmd->callback([] { set_command_action(run_bench, &a); });
}

}  // namespace pdserve
