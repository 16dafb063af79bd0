// `pdserve generate`: offline text generation with the CPU engine, streamed to the terminal;
// with --chat, the prompt (or each line typed, interactively) goes through the model's chat
// template.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>

#include "bin/commands.h"
#include "engine/generator.h"
#include "tokenizer/chat_template.h"

namespace pdserve {

namespace {
struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string system;
  bool chat = false;
  int32_t max_tokens = 256;
  int32_t context = 4096;
  int threads = 0;
  bool ignore_eos = false;
  bool json = false;
  std::vector<std::string> stop;
  std::vector<std::string> logit_bias;  // TOKEN_ID=BIAS
  SamplingParams sampling;
};

// --logit-bias TOKEN_ID=BIAS flags, sorted by id (SamplingParams::validate checks the ranges).
StatusOr<std::vector<LogitBias>> parse_logit_bias_flags(const std::vector<std::string>& flags) {
  std::vector<LogitBias> out;
  for (const std::string& f : flags) {
    const size_t eq = f.find('=');
    int64_t id = -1;
    double bias = 0;
    const char* id_end = f.data() + (eq == std::string::npos ? f.size() : eq);
    auto [p1, e1] = std::from_chars(f.data(), id_end, id);
    auto [p2, e2] = eq == std::string::npos ? std::from_chars_result{f.data(), std::errc::invalid_argument}
                                            : std::from_chars(id_end + 1, f.data() + f.size(), bias);
    if (e1 != std::errc() || p1 != id_end || e2 != std::errc() || p2 != f.data() + f.size() || id < 0 ||
        id > std::numeric_limits<int32_t>::max()) {
      return invalid_argument(
          fmt::format("--logit-bias expects TOKEN_ID=BIAS (e.g. 2=-100 to ban token 2), got '{}'", f));
    }
    out.push_back({static_cast<int32_t>(id), static_cast<float>(bias)});
  }
  if (std::optional<int32_t> twice = sort_logit_bias(out))
    return invalid_argument(fmt::format("--logit-bias names token {} twice", *twice));
  return out;
}

struct Session {
  std::shared_ptr<const GgufFile> file;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;
};

StatusOr<Session> load(const GenerateArgs& a) {
  Session s;
  std::error_code ec;
  if (std::filesystem::is_directory(a.model, ec))
    return invalid_argument(
        fmt::format("'{}' is a Hugging Face checkpoint: generate runs GGUF files on the CPU; serve the "
                    "checkpoint on a GPU "
                    "with `pdserve serve --model {} --device cuda`, or convert it to GGUF (llama.cpp's "
                    "convert_hf_to_gguf.py)",
                    a.model, a.model));
  PD_ASSIGN_OR_RETURN(auto file, GgufFile::open(a.model));
  s.file = std::shared_ptr<const GgufFile>(std::move(file));
  PD_ASSIGN_OR_RETURN(s.model, LlamaModel::load(s.file));
  PD_ASSIGN_OR_RETURN(auto tok, Tokenizer::from_gguf(*s.file));
  s.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
  if (a.chat) {
    auto src = s.file->get_string("tokenizer.chat_template");
    if (!src.ok())
      return invalid_argument("--chat: the model has no chat template (tokenizer.chat_template)");
    PD_ASSIGN_OR_RETURN(auto tmpl, ChatTemplate::parse(*src));
    s.chat_template = std::move(tmpl);
  }
  return s;
}

// Generates one answer for `prompt_text`, streaming it to stdout. Returns the answer.
StatusOr<std::string> answer(Generator& gen, Session& s, const GenerateArgs& a,
                             const std::string& prompt_text, bool print_stats) {
  GenerateRequest req;
  req.prompt = s.tokenizer->encode(prompt_text, /*add_special=*/true, /*parse_special=*/a.chat);
  req.sampling = a.sampling;
  req.max_tokens =
      std::min<int32_t>(a.max_tokens, gen.context_tokens() - static_cast<int32_t>(req.prompt.size()));
  req.stop = a.stop;
  req.ignore_eos = a.ignore_eos;
  req.response_format = a.json ? ResponseFormat::kJsonObject : ResponseFormat::kText;
  if (req.max_tokens < 1) {
    return invalid_argument(
        fmt::format("the prompt ({} tokens) fills the context of {} tokens; raise --context",
                    req.prompt.size(), gen.context_tokens()));
  }
  std::string out;
  PD_ASSIGN_OR_RETURN(GenerateStats st, gen.generate(req, [&](std::string_view piece) {
    out += piece;
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    return true;
  }));
  std::fputc('\n', stdout);
  if (print_stats) {
    double pp = st.prefill_seconds > 0 ? st.prompt_tokens / st.prefill_seconds : 0;
    int decoded = st.generated_tokens - 1;
    double tg = st.decode_seconds > 0 && decoded > 0 ? decoded / st.decode_seconds : 0;
    fmt::print(stderr,
               "[prefill: {} tokens in {:.3f} s, {:.1f} tokens/s | decode: {} tokens in {:.3f} s, {:.1f} "
               "tokens/s | {}]\n",
               st.prompt_tokens, st.prefill_seconds, pp, decoded, st.decode_seconds, tg, st.finish_reason);
  }
  return out;
}

int run_generate(void* p) {
  auto& a = *static_cast<GenerateArgs*>(p);
  StatusOr<std::vector<LogitBias>> biases = parse_logit_bias_flags(a.logit_bias);
  if (!biases.ok()) {
    fmt::print(stderr, "error: {}\n", biases.status().message());
    return 2;
  }
  a.sampling.logit_bias = std::move(*biases);
  if (Status v = a.sampling.validate(); !v.ok()) {
    fmt::print(stderr, "error: {}\n", v.message());
    return 2;
  }
  auto t0 = std::chrono::steady_clock::now();
  auto session = load(a);
  if (!session.ok()) {
    fmt::print(stderr, "error: {}\n", session.status().message());
    return 1;
  }
  Session& s = *session;
  if (!a.sampling.logit_bias.empty() && a.sampling.logit_bias.back().token >= s.model->config().vocab_size) {
    fmt::print(stderr, "error: --logit-bias names token {}, outside the vocabulary (0..{})\n",
               a.sampling.logit_bias.back().token, s.model->config().vocab_size - 1);
    return 2;
  }
  int32_t context = std::min(a.context, s.model->config().context_length);
  ThreadPool pool(a.threads);
  Generator gen(*s.model, *s.tokenizer, pool, context);
  fmt::print(stderr, "[loaded {} ({} layers) in {:.2f} s; {} threads, context {} tokens]\n",
             s.model->config().name, s.model->config().num_layers,
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), pool.num_threads(),
             context);

  if (!a.chat) {
    if (a.prompt.empty()) {
      fmt::print(stderr, "error: --prompt is required without --chat\n");
      return 2;
    }
    std::fputs(a.prompt.c_str(), stdout);
    auto r = answer(gen, s, a, a.prompt, true);
    if (!r.ok()) {
      fmt::print(stderr, "error: {}\n", r.status().message());
      return 1;
    }
    return 0;
  }

  ChatTemplateInputs inputs;
  inputs.add_generation_prompt = true;
  inputs.bos_token =
      s.tokenizer->bos_id() >= 0 ? std::string(s.tokenizer->token_text(s.tokenizer->bos_id())) : "";
  inputs.eos_token =
      s.tokenizer->eos_id() >= 0 ? std::string(s.tokenizer->token_text(s.tokenizer->eos_id())) : "";
  if (!a.system.empty()) inputs.messages.push_back({.role = "system", .content = a.system});
  auto turn = [&](const std::string& user) -> bool {
    inputs.messages.push_back({.role = "user", .content = user});
    auto text = s.chat_template->render(inputs);
    if (!text.ok()) {
      fmt::print(stderr, "error: {}\n", text.status().message());
      inputs.messages.pop_back();
      return false;
    }
    auto reply = answer(gen, s, a, *text, true);
    if (!reply.ok()) {
      fmt::print(stderr, "error: {}\n", reply.status().message());
      inputs.messages.pop_back();
      return false;
    }
    inputs.messages.push_back({.role = "assistant", .content = *reply});
    return true;
  };
  if (!a.prompt.empty()) return turn(a.prompt) ? 0 : 1;
  fmt::print(stderr,
             "[chat with {}: type a message and press Enter; /reset clears the conversation; Ctrl-D quits]\n",
             s.model->config().name);
  std::string line;
  while (true) {
    std::fputs("> ", stdout);
    std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (line == "/reset") {
      inputs.messages.resize(a.system.empty() ? 0 : 1);
      continue;
    }
    turn(line);
  }
  std::fputc('\n', stdout);
  return 0;
}
}  // namespace

void register_generate_command(CLI::App& app) {
  auto* a = new GenerateArgs();  // lives for the process
  a->model = default_model_path();
  CLI::App* cmd = app.add_subcommand("generate",
                                     "Generate text with the CPU engine, streamed to the terminal; "
                                     "ends with prefill and decode speeds");
  cmd->add_option("-m,--model", a->model, "GGUF model file (default: the default model, or $PDSERVE_MODEL)")
      ->capture_default_str();
  cmd->add_option("-p,--prompt", a->prompt,
                  "Prompt text (with --chat: the user message; omit for an interactive chat)");
  cmd->add_flag("--chat", a->chat, "Apply the model's chat template; without --prompt, chat interactively");
  cmd->add_option("--system", a->system, "System message for --chat");
  cmd->add_option("-n,--max-tokens", a->max_tokens, "Most tokens to generate")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("-c,--context", a->context,
                  "Context size in tokens (prompt + generated); capped at the model's")
      ->capture_default_str()
      ->check(CLI::Range(16, 1 << 24));
  cmd->add_option("-t,--threads", a->threads, "CPU threads (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature (0, or below 1e-5: greedy)")
      ->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Keep the k most likely tokens (0: off)")
      ->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p,
                  "Keep the smallest set of tokens with this probability mass (1: off)")
      ->capture_default_str();
  cmd->add_option("--min-p", a->sampling.min_p, "Drop tokens below min-p times the top probability (0: off)")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", a->sampling.repetition_penalty, "Repetition penalty (1: off)")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", a->sampling.presence_penalty, "Presence penalty, -2..2")
      ->capture_default_str();
  cmd->add_option("--frequency-penalty", a->sampling.frequency_penalty, "Frequency penalty, -2..2")
      ->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Random seed for sampling")->capture_default_str();
  cmd->add_option("--stop", a->stop, "Stop before this string (repeatable)");
  cmd->add_option("--logit-bias", a->logit_bias,
                  "TOKEN_ID=BIAS: add BIAS (-100..100) to the token's logit before sampling; -100 bans it "
                  "(repeatable; a server's POST /tokenize gives token ids)")
      ->type_name("ID=BIAS");
  cmd->add_flag("--json", a->json,
                "JSON mode: the answer is one JSON object (tokens that would break it are masked before each "
                "draw; the prompt should still ask for JSON)");
  cmd->add_flag("--ignore-eos", a->ignore_eos,
                "Keep generating past end-of-generation tokens (for benchmarks)");
  cmd->callback([a] { set_command_action(run_generate, a); });
}

}  // namespace pdserve
