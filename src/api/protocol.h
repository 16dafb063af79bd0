// The OpenAI-compatible wire protocol: request bodies of POST /v1/chat/completions,
// /v1/completions, /tokenize and /detokenize parsed into typed structs (every failure an
// ApiError naming the field and what was expected), and response bodies, streamed chunks and
// Server-Sent Events framing serialized from typed structs. JSON (nlohmann-json) stays inside
// protocol.cpp; nothing here refers to HTTP connections or the engine's threads.
//
// Field policy (docs: README "HTTP API"): unknown fields are ignored, as vLLM and llama.cpp's
// server do (OpenAI itself rejects them), so clients that send provider-specific extras work; but
// an OpenAI field that would change the output and that pdserve does not implement (tools,
// response_format json_schema, suffix, best_of > 1, audio, echo with logprobs)
// is rejected with 400 naming the field, never silently ignored. `null` means "not set" for every
// optional field. Extensions beyond OpenAI: top_k, min_p, repetition_penalty, ignore_eos.
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "api/api_error.h"
#include "engine/json_constraint.h"
#include "engine/sampler.h"
#include "tokenizer/chat_template.h"

namespace pdserve::api {

enum class Endpoint { kChatCompletions, kCompletions };

// Bounds on what one request may ask for.
inline constexpr int kMaxJsonDepth = 64;   // nesting of the request body
inline constexpr int kMaxStopStrings = 4;  // as OpenAI
inline constexpr int kMaxChoices = 64;     // prompts × n
inline constexpr int kMaxTopLogprobsChat = 20;
inline constexpr int kMaxLogprobsCompletions = 5;

// What chat and completions requests share.
struct GenerationParams {
  std::string model;  // empty: not given (the served model)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // max_completion_tokens, else max_tokens. Unset: up to the end of the context (chat) or 16
  // (completions, OpenAI's default).
  std::optional<int32_t> max_tokens;
  SamplingParams sampling;      // temperature, top_p, top_k, min_p, penalties, top_logprobs
  std::optional<int64_t> seed;  // unset: a random seed per request
  std::vector<std::string> stop;
  bool logprobs = false;  // report log-probabilities (sampling.top_logprobs alternatives per token)
  int32_t n = 1;          // choices per prompt; choice i samples with seed + i
  std::string user;
  bool ignore_eos = false;
  std::string scenario;                                    // metadata.scenario (a gateway's labelling), or ""
  ResponseFormat response_format = ResponseFormat::kText;  // response_format.type
};

struct ChatCompletionRequest {
  GenerationParams params;
  std::vector<ChatMessage> messages;  // non-empty; "developer" becomes "system"
};

struct PromptInput {
  bool is_tokens = false;
  std::string text;             // when !is_tokens
  std::vector<int32_t> tokens;  // when is_tokens (ids are checked against the vocabulary later)
};

struct CompletionRequest {
  GenerationParams params;
  std::vector<PromptInput> prompts;  // non-empty; each gets n choices, index = prompt * n + i
  bool echo = false;                 // put the prompt in front of the completion
};

// POST /tokenize: {"content" | "prompt": text, "add_special": bool, "parse_special": bool}.
struct TokenizeRequest {
  std::string model;
  std::string text;
  bool add_special = true;    // BOS/EOS as the vocabulary says
  bool parse_special = true;  // control-token text (<|im_start|>) becomes that token
};

// POST /detokenize: {"tokens": [ids]}.
struct DetokenizeRequest {
  std::string model;
  std::vector<int32_t> tokens;
};

ApiResult<ChatCompletionRequest> parse_chat_completion_request(std::string_view body);
ApiResult<CompletionRequest> parse_completion_request(std::string_view body);
ApiResult<TokenizeRequest> parse_tokenize_request(std::string_view body);
ApiResult<DetokenizeRequest> parse_detokenize_request(std::string_view body);

// ---- responses ----------------------------------------------------------------------------

struct LogprobAlternative {
  std::string token;  // the token's bytes (may be part of a UTF-8 character)
  float logprob = 0;
};

struct TokenLogprobs {
  std::string token;
  float logprob = 0;
  std::vector<LogprobAlternative> top;  // best first
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens served from the prefix cache
};

struct ResponseMeta {
  std::string id;       // "chatcmpl-..." or "cmpl-..."
  int64_t created = 0;  // Unix seconds
  std::string model;
};

// One choice: a whole answer (non-streaming) or the delta of one streamed chunk.
struct ChoiceResult {
  int32_t index = 0;
  std::string text;
  std::string finish_reason;  // empty: null
  bool logprobs = false;      // false: "logprobs": null
  std::vector<TokenLogprobs> token_logprobs;
  // Completions: text offset of the first token here (bytes of echoed prompt and of earlier chunks).
  int64_t text_offset = 0;
};

// A whole non-streaming response.
std::string chat_completion_body(const ResponseMeta& meta, std::span<const ChoiceResult> choices,
                                 const Usage& usage);
std::string completion_body(const ResponseMeta& meta, std::span<const ChoiceResult> choices,
                            const Usage& usage);

// Streamed chunks (JSON only; frame them with sse_data). with_role: the chat delta carries
// "role": "assistant" (each choice's first chunk). include_usage: the chunk carries "usage": null
// as OpenAI's do when stream_options.include_usage is set.
std::string chat_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool with_role,
                       bool include_usage);
std::string completion_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool include_usage);
// The last chunk when include_usage: no choices, the usage.
std::string usage_chunk(const ResponseMeta& meta, Endpoint endpoint, const Usage& usage);

// "data: <payload>\n\n"
std::string sse_data(std::string_view payload);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";
inline constexpr std::string_view kSseContentType = "text/event-stream";
inline constexpr std::string_view kJsonContentType = "application/json";

// GET /v1/models and /v1/models/{id}.
// GET /v1/models: every name a client may pass as "model".
std::string models_body(std::span<const std::string> models, int64_t created, int32_t max_context);
std::string model_body(std::string_view model, int64_t created, int32_t max_context);
std::string tokenize_body(std::span<const int32_t> tokens, int32_t max_context);
std::string detokenize_body(std::string_view text);
// GET /health: {"status": status}
std::string health_body(std::string_view status);

}  // namespace pdserve::api
