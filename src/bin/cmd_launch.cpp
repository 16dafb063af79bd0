// `pdserve launch cluster.toml`: starts the instances of a cluster configuration and a gateway
// over them as separate processes on this host, shows their logs with each process's name in
// front, restarts an instance that crashes after it was up, and stops them all cleanly on Ctrl-C
// (the gateway first, so that it drains; then the instances).
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bin/commands.h"
#include "bin/serve_support.h"
#include "gateway/cluster_config.h"

namespace pdserve {

namespace {

using Clock = std::chrono::steady_clock;

struct LaunchArgs {
  std::string config_path;
  std::string model;
  int stop_timeout_s = 30;
  bool no_restart = false;
  // An instance that crashes sooner than this after its start is not restarted: the cluster stops
  // (a bad setting, a port in use) instead of restarting it in a loop.
  double restart_min_uptime_s = 10;
  bool dry_run = false;
};

struct Child {
  std::string name;
  std::vector<std::string> argv;  // argv[0] is the pdserve binary
  bool is_gateway = false;
  pid_t pid = -1;  // -1: not running
  Clock::time_point started;
  int restarts = 0;
  int backoff_s = 0;  // the last restart's delay
  std::optional<Clock::time_point> restart_at;
  std::thread reader;  // prefixes the current run's output; joined before the next run
};

std::string shell_quote(const std::string& s) {
  if (!s.empty() &&
      s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=@,") ==
          std::string::npos) {
    return s;
  }
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string s;
  for (const std::string& a : argv) s += (s.empty() ? "" : " ") + shell_quote(a);
  return s;
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("ended (wait status {})", status);
}

class Launcher {
 public:
  explicit Launcher(std::string exe) : exe_(std::move(exe)) {}
  ~Launcher() {
    for (Child& c : children_) {
      if (c.reader.joinable()) c.reader.join();
    }
  }

  void add(Child c) { children_.push_back(std::move(c)); }
  std::vector<Child>& children() { return children_; }

  void print(const std::string& line) {
    std::lock_guard<std::mutex> lock(out_mu_);
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
  }

  // Starts `c` with its output piped into a reader thread that prefixes each line.
  Status spawn(Child& c) {
    if (c.reader.joinable()) c.reader.join();  // the previous run's output, to its end
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return internal_error(fmt::format("pipe: {}", std::strerror(errno)));
    std::vector<char*> argv;
    for (std::string& a : c.argv) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      close(fds[0]);
      close(fds[1]);
      return internal_error(fmt::format("fork: {}", std::strerror(errno)));
    }
    if (pid == 0) {
      // Only async-signal-safe calls until exec. Its own process group: Ctrl-C at the terminal
      // reaches the launcher alone, which stops the children in order. It dies with the launcher.
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);         // the launcher blocks SIGINT/SIGTERM in all threads
      const int null_fd = open("/dev/null", O_RDONLY);  // not the terminal: it is in another group
      if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
      dup2(fds[1], STDOUT_FILENO);
      dup2(fds[1], STDERR_FILENO);
      execv(argv[0], argv.data());
      constexpr char kExecFailed[] =
          "pdserve launch: cannot execute the pdserve binary (was it replaced or removed since the "
          "launch?)\n";
      (void)!write(STDERR_FILENO, kExecFailed, sizeof(kExecFailed) - 1);
      _exit(127);
    }
    close(fds[1]);
    c.pid = pid;
    c.started = Clock::now();
    c.reader = std::thread([this, fd = fds[0], prefix = fmt::format("{:<{}} | ", c.name, name_width_)] {
      FILE* in = fdopen(fd, "r");
      if (!in) {
        close(fd);
        return;
      }
      char* line = nullptr;
      size_t cap = 0;
      ssize_t n;
      while ((n = getline(&line, &cap, in)) > 0) {
        std::string s = prefix + std::string(line, static_cast<size_t>(n));
        if (s.back() != '\n') s += '\n';
        print(s);
      }
      std::free(line);
      std::fclose(in);
    });
    return ok_status();
  }

  void set_name_width(size_t w) { name_width_ = w; }

  void signal_all(int sig, bool gateway) {
    for (Child& c : children_) {
      if (c.pid > 0 && c.is_gateway == gateway) kill(c.pid, sig);
    }
  }
  bool any_running(bool gateway) const {
    for (const Child& c : children_) {
      if (c.pid > 0 && c.is_gateway == gateway) return true;
    }
    return false;
  }

  // Reaps exited children: calls on_exit(child, status) for each.
  template <typename F>
  void reap(F&& on_exit) {
    for (;;) {
      int status = 0;
      const pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid <= 0) return;
      for (Child& c : children_) {
        if (c.pid == pid) {
          c.pid = -1;
          on_exit(c, status);
        }
      }
    }
  }

 private:
  std::string exe_;
  std::vector<Child> children_;
  std::mutex out_mu_;
  size_t name_width_ = 8;
};

StatusOr<std::string> self_exe() {
  std::string buf(4096, '\0');
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) return internal_error(fmt::format("cannot find the pdserve binary: {}", std::strerror(errno)));
  buf.resize(static_cast<size_t>(n));
  return buf;
}

int run_launch(void* p) {
  auto& a = *static_cast<LaunchArgs*>(p);
  StatusOr<ClusterConfig> config = load_cluster_config(a.config_path);
  if (!config.ok()) {
    fmt::print(stderr, "error: {}\n", config.status().message());
    return 2;
  }
  if (config->instances.empty()) {
    fmt::print(stderr, "error: {}: no [[instance]] to launch\n", a.config_path);
    return 2;
  }
  StatusOr<std::string> exe = self_exe();
  if (!exe.ok()) {
    fmt::print(stderr, "error: {}\n", exe.status().message());
    return 1;
  }
  const std::string model = !a.model.empty()         ? a.model
                            : !config->model.empty() ? config->model
                                                     : default_model_path();

  Launcher launcher(*exe);
  size_t width = std::string("gateway").size();
  for (const InstanceConfig& ic : config->instances) {
    Child c;
    c.name = ic.name;
    c.argv = {*exe,      "instance", "--role",      ic.role,
              "--host",  ic.host,    "--port",      std::to_string(ic.port),
              "--model", model,      "--transport", config->transport};
    for (const auto& [flag, value] : ic.flags) {
      c.argv.push_back(flag);
      if (!value.empty()) c.argv.push_back(value);
    }
    width = std::max(width, c.name.size());
    launcher.add(std::move(c));
  }
  Child gw;
  gw.name = "gateway";
  gw.is_gateway = true;
  gw.argv = {*exe,      "gateway", "--config",           a.config_path,
             "--model", model,     "--shutdown-timeout", std::to_string(a.stop_timeout_s)};
  launcher.add(std::move(gw));
  launcher.set_name_width(width);

  if (a.dry_run) {
    for (const Child& c : launcher.children()) fmt::print("{}\n", command_line(c.argv));
    return 0;
  }

  // The internal API's shared secret, inherited by every process through the environment (never
  // on a command line, which `ps` shows).
  if (const char* t = std::getenv("PDSERVE_INTERNAL_TOKEN"); !t || !*t) {
    std::random_device rd;
    std::string token;
    for (int i = 0; i < 4; ++i) token += fmt::format("{:08x}", rd());
    setenv("PDSERVE_INTERNAL_TOKEN", token.c_str(), 1);
  }

  std::signal(SIGPIPE, SIG_IGN);
  start_signal_thread();
  set_loading(false);  // a signal stops the children in order, not the launcher at once
  const std::string url_host = config->gateway.host == "0.0.0.0" ? "127.0.0.1" : config->gateway.host;
  launcher.print(fmt::format(
      "launch: {} instance{} in {} scenario{} and a gateway on http://{}:{} (model {})\n",
      config->instances.size(), config->instances.size() == 1 ? "" : "s", config->scenarios.size(),
      config->scenarios.size() == 1 ? "" : "s", url_host, config->gateway.port, model));
  for (Child& c : launcher.children()) {
    if (Status st = launcher.spawn(c); !st.ok()) {
      fmt::print(stderr, "error: starting {}: {}\n", c.name, st.message());
      launcher.signal_all(SIGKILL, false);
      launcher.signal_all(SIGKILL, true);
      launcher.reap([](Child&, int) {});
      return 1;
    }
    launcher.print(fmt::format("launch: started {} (pid {}): {}\n", c.name, c.pid, command_line(c.argv)));
  }

  // Running, then stopping: the gateway (it drains up to its own shutdown timeout), then the
  // instances. A second signal tells the gateway to cancel what still runs.
  enum class Phase { kRunning, kStoppingGateway, kStoppingInstances };
  Phase phase = Phase::kRunning;
  int exit_code = 0;
  int signals_seen = 0;
  Clock::time_point phase_deadline;
  const auto gateway_grace = std::chrono::seconds(a.stop_timeout_s + 5);
  const auto instance_grace = std::chrono::seconds(15);
  auto stop_instances = [&] {
    phase = Phase::kStoppingInstances;
    phase_deadline = Clock::now() + instance_grace;
    launcher.signal_all(SIGTERM, false);
  };
  auto begin_stop = [&](int code) {
    if (phase != Phase::kRunning) return;
    exit_code = code;
    if (launcher.any_running(true)) {
      phase = Phase::kStoppingGateway;
      phase_deadline = Clock::now() + gateway_grace;
      launcher.signal_all(SIGTERM, true);
    } else {
      stop_instances();
    }
  };
  for (;;) {
    if (const int s = signals_received(); s > signals_seen) {
      if (signals_seen == 0) {
        launcher.print("launch: stopping: the gateway drains, then the instances stop\n");
        begin_stop(0);
      } else {
        launcher.print("launch: second signal: cancelling what still runs\n");
        launcher.signal_all(SIGTERM, true);
        if (phase == Phase::kStoppingInstances) launcher.signal_all(SIGTERM, false);
      }
      signals_seen = s;
    }
    launcher.reap([&](Child& c, int status) {
      if (phase != Phase::kRunning) {
        launcher.print(fmt::format("launch: {} {}\n", c.name, describe_exit(status)));
        return;
      }
      const auto uptime = Clock::now() - c.started;
      // Exit status 2 is a bad setting (pdserve's convention): restarting cannot help, however long
      // the model took to load before the setting was checked.
      const bool bad_setting = WIFEXITED(status) && WEXITSTATUS(status) == 2;
      if (c.is_gateway || a.no_restart || bad_setting ||
          uptime < std::chrono::duration<double>(a.restart_min_uptime_s)) {
        launcher.print(
            fmt::format("launch: error: {} {} after {:.1f} s; stopping the cluster (its log lines above "
                        "say why)\n",
                        c.name, describe_exit(status), std::chrono::duration<double>(uptime).count()));
        begin_stop(1);
        return;
      }
      // Back off when it keeps crashing: 1 s, then doubling up to 30 s while its runs stay short.
      c.backoff_s = uptime < std::chrono::seconds(60) ? std::min(30, std::max(1, c.backoff_s * 2)) : 1;
      ++c.restarts;
      c.restart_at = Clock::now() + std::chrono::seconds(c.backoff_s);
      launcher.print(fmt::format("launch: {} {}; restarting it in {} s (restart {})\n", c.name,
                                 describe_exit(status), c.backoff_s, c.restarts));
    });
    if (phase == Phase::kRunning) {
      for (Child& c : launcher.children()) {
        if (c.restart_at && Clock::now() >= *c.restart_at) {
          c.restart_at.reset();
          if (Status st = launcher.spawn(c); !st.ok()) {
            launcher.print(fmt::format("launch: error: restarting {}: {}\n", c.name, st.message()));
            begin_stop(1);
          } else {
            launcher.print(fmt::format("launch: restarted {} (pid {})\n", c.name, c.pid));
          }
        }
      }
    } else if (phase == Phase::kStoppingGateway) {
      if (!launcher.any_running(true)) {
        stop_instances();
      } else if (Clock::now() >= phase_deadline) {
        launcher.print("launch: the gateway did not stop in time; killing it\n");
        launcher.signal_all(SIGKILL, true);
        phase_deadline = Clock::now() + instance_grace;
      }
    } else {
      if (!launcher.any_running(false) && !launcher.any_running(true)) break;
      if (Clock::now() >= phase_deadline) {
        launcher.print("launch: instances did not stop in time; killing them\n");
        launcher.signal_all(SIGKILL, false);
        launcher.signal_all(SIGKILL, true);
        phase_deadline = Clock::now() + instance_grace;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  launcher.print(fmt::format("launch: stopped{}\n", exit_code == 0 ? "" : " (after an error)"));
  return exit_code;
}

}  // namespace

void register_launch_command(CLI::App& app) {
  auto* la = new LaunchArgs();  // lives for the process
  CLI::App* cmd = app.add_subcommand(
      "launch",
      "Start a cluster on this host from its configuration: every [[instance]] and a gateway, as separate "
      "processes; Ctrl-C stops them all (the gateway drains first)");
  cmd->add_option("config", la->config_path,
                  "The cluster configuration (TOML; see deploy/cluster.example.toml)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("-m,--model", la->model,
                  "GGUF model, checkpoint directory or synthetic:NAME for every process (default: the file's "
                  "`model`, else the default model)");
  cmd->add_option("--stop-timeout", la->stop_timeout_s,
                  "Seconds the gateway may drain open requests on Ctrl-C (its --shutdown-timeout)")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600));
  cmd->add_flag("--no-restart", la->no_restart,
                "Stop the whole cluster when an instance crashes, instead of restarting it");
  cmd->add_option(
         "--restart-min-uptime", la->restart_min_uptime_s,
         "Seconds an instance must have run for a crash to restart it; one that crashes sooner (a bad "
         "setting, a port in use) stops the whole cluster instead of restarting in a loop")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_flag("--dry-run", la->dry_run, "Print the command of every process and exit");
  cmd->callback([la] { set_command_action(run_launch, la); });
}

}  // namespace pdserve
