// `pdserve model info PATH`: what a model file (or a Hugging Face checkpoint directory) contains.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <map>

#include "bin/commands.h"
#include "model/gguf.h"
#include "model/model_config.h"
#include "model/safetensors.h"
#include "tokenizer/hf_tokenizer.h"

namespace pdserve {

namespace {
struct ModelInfoArgs {
  std::string path;
  bool all_metadata = false;
};

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return fmt::format("{:.1f} {}", b, units[u]);
}

void print_config(const ModelConfig& c, int64_t params) {
  fmt::print("name:            {}\n", c.name);
  fmt::print("architecture:    {}\n", c.architecture);
  fmt::print("parameters:      {:.1f} M\n", static_cast<double>(params) / 1e6);
  fmt::print("layers:          {}\n", c.num_layers);
  fmt::print("hidden size:     {}\n", c.hidden_size);
  fmt::print("ffn size:        {}\n", c.ffn_size);
  fmt::print("heads:           {} query, {} key/value (head dim {})\n", c.num_heads, c.num_kv_heads,
             c.head_dim);
  fmt::print("vocabulary:      {}\n", c.vocab_size);
  fmt::print("context length:  {}\n", c.context_length);
  fmt::print("rope:            theta {}, {} ordering, {} dims{}\n", c.rope_theta,
             c.rope_ordering == RopeOrdering::kNeox ? "neox" : "normal", c.rope_dim,
             c.rope_scaling.factor > 0 ? fmt::format(", llama3 scaling x{}", c.rope_scaling.factor) : "");
  fmt::print("rms norm eps:    {}\n", c.rms_norm_eps);
  fmt::print("tied embeddings: {}\n", c.tied_embeddings ? "yes" : "no");
  fmt::print("KV cache:        {} per token (f16), {} at the full context\n",
             human_bytes(static_cast<double>(c.kv_bytes_per_token(2))),
             human_bytes(static_cast<double>(c.kv_bytes_per_token(2)) * c.context_length));
}

// The tokenizer and chat template lines, from GGUF metadata (a checkpoint's converted tokenizer.json).
void print_tokenizer(const GgufFile& f, bool all_metadata) {
  auto str = [&f](const char* key) {
    auto v = f.get_string(key);
    return v.ok() ? *v : std::string("(none)");
  };
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  fmt::print("tokenizer:       {} (pre-tokenizer {}), {} tokens\n", str("tokenizer.ggml.model"),
             str("tokenizer.ggml.pre"), tokens && tokens->as_array() ? tokens->as_array()->items.size() : 0);
  const GgufValue* tmpl = f.find("tokenizer.chat_template");
  if (tmpl) {
    fmt::print("chat template:   {}\n", tmpl->to_display());
  } else {
    fmt::print("chat template:   (none)\n");
  }
  if (all_metadata) {
    fmt::print("\nmetadata:\n");
    for (const auto& [k, v] : f.metadata()) fmt::print("  {} = {}\n", k, v.to_display());
  }
}

// A Hugging Face checkpoint directory: config.json, the shards' headers and tokenizer.json.
int checkpoint_info(const ModelInfoArgs& args) {
  auto checkpoint = HfCheckpoint::open(args.path);
  if (!checkpoint.ok()) {
    fmt::print(stderr, "error: {}\n", checkpoint.status().message());
    return 1;
  }
  const ModelConfig& c = (*checkpoint)->config();
  fmt::print("checkpoint:      {} (Hugging Face: config.json and safetensors; runs with --device cuda)\n",
             args.path);
  print_config(c, (*checkpoint)->num_parameters());
  auto tokenizer = load_hf_tokenizer(args.path);
  if (!tokenizer.ok()) {
    fmt::print("tokenizer:       not readable by pdserve: {}\n", tokenizer.status().message());
    return 0;
  }
  print_tokenizer(**tokenizer, args.all_metadata);
  return 0;
}

int model_info(void* p) {
  auto& args = *static_cast<ModelInfoArgs*>(p);
  std::error_code ec;
  if (std::filesystem::is_directory(args.path, ec)) return checkpoint_info(args);
  auto file = GgufFile::open(args.path);
  if (!file.ok()) {
    fmt::print(stderr, "error: {}\n", file.status().message());
    return 1;
  }
  const GgufFile& f = **file;
  fmt::print("file:            {} ({}, GGUF v{}, {} tensors, {} metadata keys)\n", args.path,
             human_bytes(static_cast<double>(f.file_size())), f.version(), f.tensors().size(),
             f.metadata().size());
  auto cfg = ModelConfig::from_gguf(f);
  if (!cfg.ok()) {
    fmt::print("model:           not runnable by pdserve: {}\n", cfg.status().message());
  } else {
    int64_t params = 0;
    for (const auto& t : f.tensors()) params += t.num_elements();
    print_config(*cfg, params);
  }
  std::map<std::string, std::pair<int, uint64_t>> types;
  for (const auto& t : f.tensors()) {
    auto& e = types[std::string(ggml_type_name(t.type))];
    e.first++;
    e.second += t.size_bytes;
  }
  fmt::print("tensor types:   ");
  for (const auto& [name, e] : types)
    fmt::print(" {} x{} ({})", name, e.first, human_bytes(static_cast<double>(e.second)));
  fmt::print("\n");
  print_tokenizer(f, args.all_metadata);
  return 0;
}
}  // namespace

void register_model_commands(CLI::App& app) {
  CLI::App* model = app.add_subcommand("model", "Inspect model files");
  model->require_subcommand(1);
  auto* args = new ModelInfoArgs();  // lives for the process
  args->path = default_model_path();
  CLI::App* info = model->add_subcommand(
      "info",
      "Print a model's architecture, sizes, quantization types, tokenizer, chat template, context "
      "length and KV-cache bytes per token");
  info->add_option("path", args->path, "GGUF model file, or a Hugging Face checkpoint directory")
      ->capture_default_str();
  info->add_flag("--metadata", args->all_metadata, "Also print every metadata key and value");
  info->callback([args] { set_command_action(model_info, args); });
}

}  // namespace pdserve
