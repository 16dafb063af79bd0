// Chat templates over the Jinja engine; see chat_template.h.
#include "tokenizer/chat_template.h"

#include <utility>

namespace pdserve {

StatusOr<ChatTemplate> ChatTemplate::parse(std::string_view source) {
  PD_ASSIGN_OR_RETURN(jinja::Template t, jinja::Template::parse(source));
  return ChatTemplate(std::move(t));
}

jinja::Value ChatTemplate::message_value(const ChatMessage& message) {
  jinja::Dict d;
  d.set("role", jinja::Value::string(message.role));
  if (!message.content_value) {
    d.set("content", jinja::Value::string(message.content));
  } else if (!message.content_value->is_undefined()) {
    d.set("content", *message.content_value);
  }
  if (message.name) d.set("name", jinja::Value::string(*message.name));
  if (message.tool_calls) d.set("tool_calls", *message.tool_calls);
  if (message.tool_call_id) d.set("tool_call_id", jinja::Value::string(*message.tool_call_id));
  return jinja::Value::dict(std::move(d));
}

jinja::Dict ChatTemplate::make_variables(const ChatTemplateInputs& inputs) {
  std::vector<jinja::Value> messages;
  messages.reserve(inputs.messages.size());
  for (const ChatMessage& m : inputs.messages) messages.push_back(message_value(m));
  jinja::Dict vars;
  vars.set("messages", jinja::Value::list(std::move(messages)));
  vars.set("tools", inputs.tools ? *inputs.tools : jinja::Value::none());
  vars.set("documents", jinja::Value::none());
  vars.set("add_generation_prompt", jinja::Value::boolean(inputs.add_generation_prompt));
  vars.set("bos_token", jinja::Value::string(inputs.bos_token));
  vars.set("eos_token", jinja::Value::string(inputs.eos_token));
  for (const auto& [key, value] : inputs.extra_variables.items()) vars.set(key, value);
  return vars;
}

StatusOr<std::string> ChatTemplate::render(const ChatTemplateInputs& inputs) const {
  return template_.render(make_variables(inputs), inputs.options);
}

StatusOr<std::string> ChatTemplate::render_variables(const jinja::Dict& variables,
                                                     const jinja::RenderOptions& options) const {
  return template_.render(variables, options);
}

}  // namespace pdserve
