// pdserve: one binary, subcommands (DESIGN.md §2). main() and subcommand wiring only.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>

#include "bin/commands.h"
#include "common/log.h"

int main(int argc, char** argv) {
  // The log level of this process and of the instances `pdserve launch` starts (they inherit it).
  if (const char* name = std::getenv("PDSERVE_LOG_LEVEL"); name != nullptr && *name != '\0') {
    pdserve::LogLevel level;
    if (!pdserve::parse_log_level(name, &level)) {
      std::fprintf(stderr,
                   "pdserve: PDSERVE_LOG_LEVEL=%s is not a log level (debug, info, warn, error or off)\n",
                   name);
      return 2;
    }
    pdserve::set_log_level(level);
  }
  CLI::App app{
      "pdserve — serves large language models with prefill and decode disaggregated.\n"
      "Run 'pdserve COMMAND --help' for the options of a command."};
  app.require_subcommand(1);
  app.set_version_flag("--version", pdserve::version_text());

  pdserve::register_model_commands(app);
  pdserve::register_generate_command(app);
  pdserve::register_serve_command(app);
  pdserve::register_cluster_commands(app);
  pdserve::register_launch_command(app);
  pdserve::register_bench_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return pdserve::run_selected_command(app);
}
