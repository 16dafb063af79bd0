// Chat templates: turn a conversation into the prompt text a model expects by rendering the
// model's Jinja chat template (GGUF key tokenizer.chat_template) the way Hugging Face
// transformers' apply_chat_template does, byte for byte (see tokenizer/jinja.h for the engine
// and tools/reference/gen_chat_template_fixtures.py for the reference environment).
//
// parse() rejects, at load time, any template that uses a construct the engine does not
// implement, naming the construct and its line and column; a template that loads renders
// exactly what Python's jinja2 renders, or fails with a Status (e.g. the template's own
// raise_exception("Conversation roles must alternate ...") comes back as kInvalidArgument with
// exactly that message).
//
// Thread-safety: a ChatTemplate is immutable after parse(); render() may be called concurrently
// from many threads. Inputs are borrowed for the duration of the call only.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "tokenizer/jinja.h"

namespace pdserve {

// One turn of a conversation, as the template sees it: a dict with the keys role, content and,
// when set, name, tool_calls and tool_call_id, in that order. Keys left unset are absent from
// the dict (undefined in the template), as in transformers.
struct ChatMessage {
  std::string role;
  std::string content;
  // Replaces `content` when set: Value::none() (e.g. an assistant turn that only calls tools),
  // a list of typed parts ({"type": "text", "text": ...}, {"type": "image_url", ...}), or an
  // undefined Value to leave the "content" key out of the message altogether.
  std::optional<jinja::Value> content_value;
  std::optional<std::string> name;
  // A list of {"id", "type": "function", "function": {"name", "arguments"}} dicts; transformers'
  // convention is that "arguments" is a dict (not a JSON string).
  std::optional<jinja::Value> tool_calls;
  std::optional<std::string> tool_call_id;
};

struct ChatTemplateInputs {
  std::vector<ChatMessage> messages;
  bool add_generation_prompt = true;
  std::string bos_token;
  std::string eos_token;
  // A list of JSON function schemas. Unset: the template sees tools = None (as transformers
  // passes it), not an undefined variable.
  std::optional<jinja::Value> tools;
  // Further template variables (e.g. date_string for Llama 3.1, enable_thinking); they take
  // precedence over the ones above.
  jinja::Dict extra_variables;
  // Limits and the clock strftime_now() reads.
  jinja::RenderOptions options;
};

class ChatTemplate {
 public:
  // Parses `source`; any construct the renderer cannot handle is an error here (kUnimplemented
  // or kInvalidArgument), naming the construct and its line and column.
  static StatusOr<ChatTemplate> parse(std::string_view source);

  // Renders the conversation into a prompt.
  StatusOr<std::string> render(const ChatTemplateInputs& inputs) const;

  // Renders with exactly these template variables (for callers that build the variables
  // themselves, e.g. from a JSON request, and for golden tests).
  StatusOr<std::string> render_variables(const jinja::Dict& variables,
                                         const jinja::RenderOptions& options = {}) const;

  // The variables render() passes to the template, in apply_chat_template's order: messages,
  // tools, documents (None), add_generation_prompt, bos_token, eos_token, then the extras.
  static jinja::Dict make_variables(const ChatTemplateInputs& inputs);
  static jinja::Value message_value(const ChatMessage& message);

 private:
  explicit ChatTemplate(jinja::Template t) : template_(std::move(t)) {}
  jinja::Template template_;
};

}  // namespace pdserve
