// Subcommand registration. Each register_* adds a CLI11 subcommand whose callback stores the
// action to run; run_selected_command runs it and returns the process exit code.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace pdserve {

void register_model_commands(CLI::App& app);
void register_generate_command(CLI::App& app);
void register_serve_command(CLI::App& app);
void register_cluster_commands(CLI::App& app);  // instance, gateway
void register_launch_command(CLI::App& app);
void register_bench_command(CLI::App& app);
int run_selected_command(CLI::App& app);

// Used by register_* to set the action.
void set_command_action(int (*action)(void*), void* state);

// The default model path: $PDSERVE_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf
// under the directory the project was built from.
const char* default_model_path();
// `pdserve --version`: the version and what this build has (the CUDA backend, the KV transports).
std::string version_text();
// The default model as built in ($PDSERVE_MODEL aside): synthetic models borrow its tokenizer.
const char* builtin_model_path();

}  // namespace pdserve
