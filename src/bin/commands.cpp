#include "bin/commands.h"

#include <CLI/CLI.hpp>
#include <cstdlib>

#include "bin/serve_support.h"
#include "transfer/kv_transport.h"

namespace pdserve {

namespace {
int (*g_action)(void*) = nullptr;
void* g_state = nullptr;
}  // namespace

void set_command_action(int (*action)(void*), void* state) {
  g_action = action;
  g_state = state;
}

int run_selected_command(CLI::App&) { return g_action ? g_action(g_state) : 2; }

std::string version_text() {
  std::string transports = "inproc, shm, tcp";
  if (ucx_transport_built()) transports += ", ucx";
  if (cuda_backend_built()) transports += ", cuda-ipc";
  return std::string("pdserve 0.1.0\nCUDA backend: ") + (cuda_backend_built() ? "yes" : "no") +
         "\nKV transports: " + transports;
}

const char* default_model_path() {
  if (const char* env = std::getenv("PDSERVE_MODEL"); env && *env) return env;
  return PDSERVE_DEFAULT_MODEL;
}

const char* builtin_model_path() { return PDSERVE_DEFAULT_MODEL; }

}  // namespace pdserve
