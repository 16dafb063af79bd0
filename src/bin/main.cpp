// pdserve: one binary, subcommands (DESIGN.md §2). main() and subcommand wiring only.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "bin/commands.h"

int main(int argc, char** argv) {
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
