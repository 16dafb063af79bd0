// `pdserve instance`: one engine of a role (prefill, decode or mixed) serving the internal API to
// gateways; `pdserve gateway`: the OpenAI-compatible API and the Router over instances in other
// processes. The KV moves between instances over shared memory (same host) or TCP.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "api/http_server.h"
#include "api/instance_service.h"
#include "api/internal_protocol.h"
#include "bin/commands.h"
#include "bin/serve_support.h"
#include "common/host_port.h"
#include "common/log.h"
#include "common/thread_pool.h"
#include "gateway/cluster_config.h"
#include "gateway/remote_instance.h"
#include "gateway/router.h"
#include "gateway/scenario_router.h"
#include "kvcache/budget.h"

namespace pdserve {

namespace {

struct InstanceArgs {
  std::string role = "mixed";
  std::string model;
  std::string host = "127.0.0.1";
  int port = 0;
  int http_threads = 2;
  std::string transport = "shm";
  std::string kv_listen = "127.0.0.1:0";
  std::string internal_token;  // empty: $PDSERVE_INTERNAL_TOKEN, else none
  EngineFlags engine;
};

// --internal-token, else $PDSERVE_INTERNAL_TOKEN, else none.
std::string internal_token_or_env(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* env = std::getenv("PDSERVE_INTERNAL_TOKEN");
  return env ? std::string(env) : std::string();
}

constexpr const char* kInternalTokenHelp =
    "Shared secret of the internal API between the gateway and its instances: instances refuse calls "
    "without it (401), the gateway sends it (default: $PDSERVE_INTERNAL_TOKEN; none: no check). "
    "`pdserve launch` makes one per cluster";

EngineRole role_of(const std::string& name) {
  if (name == "prefill") return EngineRole::kPrefill;
  if (name == "decode") return EngineRole::kDecode;
  return EngineRole::kMixed;
}

int run_instance(void* p) {
  auto& a = *static_cast<InstanceArgs*>(p);
  const EngineRole role = role_of(a.role);
  std::signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  start_signal_thread();

  // The internal API answers 503 until the engine is up.
  std::atomic<api::InstanceService*> service{nullptr};
  api::HttpServerOptions http;
  http.host = a.host;
  http.port = static_cast<uint16_t>(a.port);
  http.num_threads = a.http_threads;
  http.max_body_bytes = size_t{256} << 20;
  http.error_response = [](int status, std::string message) {
    return api::HttpResponse{
        status, "application/json", api::encode_status(internal_error(std::move(message))), {}};
  };
  auto server_or =
      api::HttpServer::start(http, [&service](api::HttpRequest r, std::shared_ptr<api::ResponseChannel> c) {
        if (api::InstanceService* s = service.load()) return s->handle(std::move(r), std::move(c));
        c->respond({503, "application/json", api::encode_status(unavailable("the instance is loading")), {}});
      });
  if (!server_or.ok()) {
    fmt::print(stderr, "error: {}\n", server_or.status().message());
    return 1;
  }
  std::unique_ptr<api::HttpServer> server = std::move(server_or).value();
  PD_LOG_INFO("instance: {} role, listening on http://{}:{}; loading {}", a.role, a.host, server->port(),
              a.model);

  StatusOr<DeviceChoice> device = parse_device(a.engine.device, a.engine.dtype);
  if (!device.ok()) {
    fmt::print(stderr, "error: {}\n", device.status().message());
    return 2;
  }
  if (role != EngineRole::kMixed && !device->cuda && a.transport == "cuda-ipc") {
    fmt::print(stderr,
               "error: a {} instance on the CPU keeps its KV cache in host memory: give --transport shm, tcp "
               "or ucx, "
               "not cuda-ipc (which moves GPU memory)\n",
               a.role);
    return 2;
  }
  StatusOr<LoadedModel> loaded = load_model_for(a.model, *device);
  if (!loaded.ok()) {
    fmt::print(stderr, "error: {}\n", loaded.status().message());
    return 1;
  }
  StatusOr<ModelConfig> config = loaded_model_config(*loaded);
  if (!config.ok()) {
    fmt::print(stderr, "error: {}\n", config.status().message());
    return 1;
  }
  const ModelConfig& cfg = *config;
  StatusOr<EngineOptions> options = engine_options(a.engine, cfg);
  if (!options.ok()) {
    fmt::print(stderr, "error: {}\n", options.status().message());
    return 2;
  }
  EngineOptions& eo = *options;
  eo.role = role;
  KvTransport transport;
  std::string transport_name;
  if (role != EngineRole::kMixed) {
    StatusOr<TransportKind> kind = parse_transport_kind(a.transport);
    if (!kind.ok()) {
      fmt::print(stderr, "error: --transport: {}\n", kind.status().message());
      return 2;
    }
    StatusOr<KvTransportOptions> pool_options = send_pool_options(a.engine, cfg, eo.max_context);
    if (!pool_options.ok()) {
      fmt::print(stderr, "error: {}\n", pool_options.status().message());
      return 2;
    }
    KvTransportOptions to = *pool_options;
    to.send = role == EngineRole::kPrefill;
    to.receive = role == EngineRole::kDecode;
    to.tcp_listen = a.kv_listen;
    to.cuda_device = device->index;
    StatusOr<KvTransport> t = make_instance_transport(*kind, to, device->cuda);
    if (!t.ok()) {
      fmt::print(stderr, "error: KV transport '{}': {}\n", a.transport, t.status().message());
      return 1;
    }
    transport = std::move(t).value();
    transport_name = a.transport;
  }
  eo.kv_send = transport.pool.get();
  eo.kv_puller = transport.puller.get();
  if (Status st = eo.validate(); !st.ok()) {
    fmt::print(stderr, "error: {}\n", st.message());
    return 2;
  }
  ThreadPool pool(a.engine.threads);
  StatusOr<std::unique_ptr<ModelExecutor>> executor = make_executor(*device, *loaded, pool, eo);
  if (!executor.ok()) {
    fmt::print(stderr, "error: {}\n", executor.status().message());
    return executor.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  auto engine = std::make_unique<Engine>(std::move(executor).value(), *loaded->tokenizer, eo);
  const std::string token = internal_token_or_env(a.internal_token);
  if (token.empty()) {
    PD_LOG_WARN("instance: no --internal-token: anyone who reaches {}:{} may submit requests and release KV",
                a.host, server->port());
  }
  api::InstanceService instance_service(*engine, transport_name, token);
  service.store(&instance_service);
  set_loading(false);
  PD_LOG_INFO("instance: ready: {} role on {}, KV cache {} blocks x {} tokens ({}){}", a.role,
              engine->device(), eo.num_blocks, eo.block_size, format_bytes(engine->kv_bytes()),
              transport.pool ? fmt::format(", KV send pool of {} at {}",
                                           format_bytes(transport.pool->stats().capacity_bytes),
                                           transport.pool->endpoint())
                             : std::string());

  while (signals_received() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  PD_LOG_INFO("instance: shutting down");
  server->stop_accepting();
  engine->shutdown();  // cancels what runs; gateways see the streams end
  server->stop();
  service.store(nullptr);
  server.reset();
  engine.reset();
  PD_LOG_INFO("instance: stopped");
  return 0;
}

struct GatewayArgs {
  std::string config_path;
  std::vector<std::string> prefills;
  std::vector<std::string> decodes;
  std::string internal_token;
  int connect_timeout_s = 60;
  int stream_threads = 4;
  FrontOptions front{.command = "gateway"};
  RouterFlags router;
  CLI::App* cmd = nullptr;
};

// The gateway's objects: remote instances and the routers over them.
struct GatewayState {
  LoadedModel model;  // tokenizer and chat template only
  std::vector<std::unique_ptr<RemoteInstance>> instances;
  std::unique_ptr<ScenarioRouter> router;
};

// Connects to an instance, retrying until `deadline` (instances may still be loading).
StatusOr<std::unique_ptr<RemoteInstance>> connect_until(const std::string& address,
                                                        const RemoteInstanceOptions& options,
                                                        std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    auto r = RemoteInstance::connect(address, options);
    if (r.ok() || r.status().code() == StatusCode::kUnauthenticated ||
        std::chrono::steady_clock::now() >= deadline) {
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// "host:port" as an instance of the configuration (the flags' single-scenario form).
StatusOr<InstanceConfig> instance_at(const std::string& address, const std::string& role,
                                     const std::string& scenario) {
  StatusOr<HostPort> where = parse_host_port(address, /*allow_zero_port=*/false);
  if (!where.ok()) return where.status().with_context(fmt::format("--{} {}", role, address));
  InstanceConfig inst;
  inst.host = where->host;
  inst.port = where->port;
  inst.role = role;
  inst.scenario = scenario;
  inst.name = fmt::format("{}-{}", role, address);
  return inst;
}

// The cluster the gateway serves: the --config file (its [gateway] settings unless a flag was given
// on the command line), or one scenario from --prefill/--decode and the router flags.
StatusOr<ClusterConfig> gateway_cluster(GatewayArgs& a) {
  auto given = [&a](const char* flag) { return a.cmd->get_option(flag)->count() > 0; };
  if (a.config_path.empty()) {
    if (a.prefills.empty() || a.decodes.empty()) {
      return invalid_argument(
          "give the instances: --config cluster.toml, or at least one --prefill and one --decode HOST:PORT");
    }
    ClusterConfig c;
    c.transport.clear();  // whatever the instances use (checked to be one)
    c.scenarios.push_back({.name = a.router.scenario,
                           .ttft_budget_ms = a.router.ttft_budget_ms,
                           .ttft_budget_ms_per_token = a.router.ttft_budget_ms_per_token});
    c.gateway.default_scenario = a.router.scenario;
    c.gateway.admission = a.router.admission;
    for (const auto* list : {&a.prefills, &a.decodes}) {
      for (const std::string& address : *list) {
        PD_ASSIGN_OR_RETURN(
            InstanceConfig inst,
            instance_at(address, list == &a.prefills ? "prefill" : "decode", a.router.scenario));
        c.instances.push_back(std::move(inst));
      }
    }
    return c;
  }
  if (!a.prefills.empty() || !a.decodes.empty()) {
    return invalid_argument(
        "--prefill and --decode cannot be combined with --config: list the instances there");
  }
  for (const char* flag : {"--ttft-budget-ms", "--ttft-budget-ms-per-token", "--scenario"}) {
    if (given(flag)) {
      return invalid_argument(
          fmt::format("{} cannot be combined with --config: set it per [[scenario]] there", flag));
    }
  }
  PD_ASSIGN_OR_RETURN(ClusterConfig c, load_cluster_config(a.config_path));
  if (!given("--model") && !c.model.empty()) a.front.model_path = c.model;
  if (!given("--host")) a.front.host = c.gateway.host;
  if (!given("--port")) a.front.port = c.gateway.port;
  if (!given("--http-threads")) a.front.http_threads = c.gateway.http_threads;
  if (!given("--served-model-name")) a.front.served_model_name = c.gateway.served_model_name;
  if (!given("--connect-timeout")) a.connect_timeout_s = c.gateway.connect_timeout_s;
  if (!given("--stream-threads")) a.stream_threads = c.gateway.stream_threads;
  if (given("--admission")) c.gateway.admission = a.router.admission;
  return c;
}

int run_gateway(void* p) {
  auto& a = *static_cast<GatewayArgs*>(p);
  StatusOr<ClusterConfig> cluster_or = gateway_cluster(a);
  if (!cluster_or.ok()) {
    fmt::print(stderr, "error: {}\n", cluster_or.status().message());
    return 2;
  }
  auto cluster = std::make_shared<ClusterConfig>(std::move(cluster_or).value());
  for (const ScenarioConfig& s : cluster->scenarios) {
    a.front.model_aliases.insert(a.front.model_aliases.end(), s.models.begin(), s.models.end());
  }
  return run_openai_front(a.front, [&a, cluster](api::ApiService&) -> StatusOr<FrontBackend> {
    auto state = std::make_shared<GatewayState>();
    PD_ASSIGN_OR_RETURN(state->model, load_model(a.front.model_path, /*weights=*/false));
    const uint64_t fingerprint = loaded_model_fingerprint(state->model);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(a.connect_timeout_s);
    RemoteInstanceOptions remote;
    remote.token = internal_token_or_env(a.internal_token);
    // Every instance's streams on the same few threads, however many requests are open.
    remote.reactor = std::make_shared<StreamReactor>(a.stream_threads);
    std::string transport = cluster->transport;
    std::string kv_dtype, kv_dtype_from;  // of the first instance that says
    std::vector<ScenarioGroup> groups;
    for (const ScenarioConfig& scenario : cluster->scenarios) {
      std::vector<Instance*> prefills, decodes;
      for (const InstanceConfig& ic : cluster->instances) {
        if (ic.scenario != scenario.name) continue;
        const std::string address = ic.address();
        StatusOr<std::unique_ptr<RemoteInstance>> r = connect_until(address, remote, deadline);
        if (!r.ok())
          return r.status().with_context(fmt::format("{} instance {} ({})", ic.role, ic.name, address));
        RemoteInstance& inst = **r;
        const EngineRole want = ic.role == "prefill" ? EngineRole::kPrefill : EngineRole::kDecode;
        if (inst.role() != want) {
          return invalid_argument(
              fmt::format("instance {} ({}) runs the {} role, but is configured as a {} instance", ic.name,
                          address, engine_role_name(inst.role()), engine_role_name(want)));
        }
        if (inst.model_fingerprint() != fingerprint) {
          return invalid_argument(fmt::format(
              "instance {} ({}) serves model {:#x}, not {} ({:#x}): start every instance with the "
              "gateway's model",
              ic.name, address, inst.model_fingerprint(), a.front.model_path, fingerprint));
        }
        if (!transport.empty() && inst.transport() != transport) {
          return invalid_argument(fmt::format(
              "instance {} ({}) moves KV over '{}', {} over '{}'", ic.name, address, inst.transport(),
              cluster->transport.empty() ? "the others" : "the configuration", transport));
        }
        transport = inst.transport();
        // KV of one format cannot go to an engine of another (the CPU's and an fp16 GPU's are f16, a
        // bf16 GPU's bf16): refused here, not per request.
        if (!inst.kv_dtype().empty() && !kv_dtype.empty() && inst.kv_dtype() != kv_dtype) {
          return invalid_argument(fmt::format(
              "instance {} ({}) keeps its KV cache as {}, {} as {}: run every instance in one format (GPU "
              "instances: the same --dtype; CPU instances keep f16, as GPU instances do with --dtype fp16)",
              ic.name, address, inst.kv_dtype(), kv_dtype_from, kv_dtype));
        }
        if (kv_dtype.empty()) {
          kv_dtype = inst.kv_dtype();
          kv_dtype_from = fmt::format("instance {}", ic.name);
        }
        (want == EngineRole::kPrefill ? prefills : decodes).push_back(&inst);
        state->instances.push_back(std::move(r).value());
      }
      RouterOptions ro;
      ro.admission =
          cluster->gateway.admission == "baseline" ? AdmissionPolicy::kBaseline : AdmissionPolicy::kOnDemand;
      ro.scenario = scenario.name;
      ro.ttft_budget_ms = scenario.ttft_budget_ms;
      ro.ttft_budget_ms_per_token = scenario.ttft_budget_ms_per_token;
      ro.decode_wait_ms = scenario.decode_wait_ms;
      PD_LOG_INFO("gateway: scenario {}: {} prefill and {} decode instances, TTFT budget {} ms + {} ms/token",
                  scenario.name, prefills.size(), decodes.size(), ro.ttft_budget_ms,
                  ro.ttft_budget_ms_per_token);
      groups.push_back({.config = scenario, .router = std::make_unique<Router>(prefills, decodes, ro)});
    }
    state->router = std::make_unique<ScenarioRouter>(std::move(groups), cluster->gateway.default_scenario);
    FrontBackend b;
    const ScenarioRouter* router = state->router.get();
    b.backend = {.engine = state->router.get(),
                 .tokenizer = state->model.tokenizer.get(),
                 .chat_template = state->model.chat_template ? &*state->model.chat_template : nullptr,
                 .label = [router](const api::ScenarioHints& h) { return router->label(h); }};
    b.description = fmt::format("{} scenario{} over {} instances, KV over {}, {} admission",
                                cluster->scenarios.size(), cluster->scenarios.size() == 1 ? "" : "s",
                                state->instances.size(), transport, cluster->gateway.admission);
    b.shutdown = [state] {
      state->router->stop();
      for (auto& i : state->instances) i->shutdown();
    };
    b.owner = state;
    return b;
  });
}

}  // namespace

void register_cluster_commands(CLI::App& app) {
  auto* ia = new InstanceArgs();  // lives for the process
  ia->model = default_model_path();
  CLI::App* inst = app.add_subcommand(
      "instance", "Run one engine instance of a role (prefill, decode or mixed) for gateways (internal API)");
  inst->add_option("--role", ia->role, "prefill, decode or mixed")
      ->capture_default_str()
      ->check(CLI::IsMember({"prefill", "decode", "mixed"}));
  inst->add_option(
          "-m,--model", ia->model,
          "GGUF model file, a Hugging Face checkpoint directory (with --device cuda), or synthetic:NAME "
          "(default: the default model, or $PDSERVE_MODEL)")
      ->capture_default_str();
  inst->add_option("--host", ia->host, "Address of the internal API")->capture_default_str();
  inst->add_option("--port", ia->port, "Port of the internal API (0: any free port)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  inst->add_option(
          "--transport", ia->transport,
          "How KV moves between prefill and decode: shm (same host) or tcp (across hosts); ucx (across "
          "hosts over UCX: RDMA where the NIC has it, in builds with libucx); cuda-ipc (GPU to GPU, same "
          "host) for instances on GPUs, which can also use shm, tcp or ucx, staged through host memory")
      ->capture_default_str()
      ->check(CLI::IsMember({"shm", "tcp", "ucx", "cuda-ipc"}));
  inst->add_option("--kv-listen", ia->kv_listen,
                   "Prefill with --transport tcp or ucx: where its KV server listens (port 0: any free port)")
      ->capture_default_str();
  inst->add_option("--internal-token", ia->internal_token, kInternalTokenHelp);
  inst->add_option("--http-threads", ia->http_threads, "I/O threads of the internal API")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  add_engine_flags(*inst, ia->engine);
  inst->callback([ia] { set_command_action(run_instance, ia); });

  auto* ga = new GatewayArgs();
  ga->front.model_path = default_model_path();
  CLI::App* gw = app.add_subcommand(
      "gateway", "Serve the OpenAI-compatible API over prefill and decode instances in other processes");
  ga->cmd = gw;
  gw->add_option("-c,--config", ga->config_path,
                 "Cluster configuration (TOML): scenarios, their labelling rules and TTFT budgets, and the "
                 "instances of each scenario's P/D group (see deploy/cluster.example.toml). Its [gateway] "
                 "settings apply unless the same flag is given here")
      ->check(CLI::ExistingFile);
  gw->add_option("--prefill", ga->prefills,
                 "Without --config: HOST:PORT of a prefill instance's internal API (repeat for more)");
  gw->add_option("--decode", ga->decodes,
                 "Without --config: HOST:PORT of a decode instance's internal API (repeat for more)");
  gw->add_option("-m,--model", ga->front.model_path,
                 "The model the instances serve (GGUF file, checkpoint directory or synthetic:NAME): its "
                 "tokenizer and chat template are used here")
      ->capture_default_str();
  add_front_flags(*gw, ga->front);
  gw->add_option("--internal-token", ga->internal_token, kInternalTokenHelp);
  gw->add_option("--connect-timeout", ga->connect_timeout_s,
                 "Seconds to wait for the instances to answer at start")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600));
  gw->add_option("--stream-threads", ga->stream_threads,
                 "Threads that read the instances' event streams and relay them to clients, shared by "
                 "every open request (a relay that calls another instance, such as a handoff, holds "
                 "one for that round trip)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  add_router_flags(*gw, ga->router);
  gw->callback([ga] { set_command_action(run_gateway, ga); });
}

}  // namespace pdserve
