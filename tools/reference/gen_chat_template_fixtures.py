#!/usr/bin/env python3
"""Regenerates tests/golden/chat_templates/fixtures.json with Python's jinja2 (the reference).

    .venv/bin/python tools/reference/gen_chat_template_fixtures.py   (from the repository root)

Each case is a template (a file in tests/golden/chat_templates/ or an inline source), the
variables it is rendered with, and what jinja2 renders: either the exact text ("expected") or
the error it raises ("error": its type and message). src/tokenizer/chat_template_test.cpp
renders every case with the C++ engine (src/tokenizer/jinja.h) and requires byte-identical
output, or an error where jinja2 raised one (with the same message for raise_exception).

The environment is the one Hugging Face transformers builds for apply_chat_template
(transformers/utils/chat_template_utils.py, _compile_jinja_template):

  * jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
    extensions jinja2.ext.loopcontrols ({% break %}, {% continue %}) and a {% generation %}
    block that renders its body unchanged (transformers' AssistantTracker when it is not
    collecting assistant masks);
  * all other options at jinja2's defaults: keep_trailing_newline=False, autoescape=False,
    newline_sequence="\\n", the default Undefined (prints as "", errors on attribute access);
  * filters["tojson"] = json.dumps(x, ensure_ascii=False, indent=indent,
    separators=separators, sort_keys=sort_keys) (arguments in that order after x);
  * globals["raise_exception"](message) raises jinja2.exceptions.TemplateError(message);
  * globals["strftime_now"](format) = datetime.now().strftime(format); here "now" is fixed per
    case (the "now" field) so that fixtures are deterministic.

Chat cases get their variables the way apply_chat_template passes them: messages, tools (None
when there are none), documents (None), add_generation_prompt, bos_token, eos_token, then any
extra keyword arguments (e.g. date_string). Message dicts list their keys in the order the C++
ChatTemplate builds them: role, content, name, tool_calls, tool_call_id.

`--unicode-tables` instead prints the Unicode tables (case mappings, character properties)
that src/tokenizer/jinja.cpp embeds, derived from this Python's unicodedata, so that upper(),
lower(), title(), isprintable() and friends match Python's exactly.
"""

import argparse
import datetime
import json
import pathlib
import sys
import unicodedata

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE_DIR = ROOT / "tests" / "golden" / "chat_templates"
FIXTURES = TEMPLATE_DIR / "fixtures.json"
DEFAULT_NOW = "2024-09-05T13:37:00"


class GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def make_environment(now):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return now.strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# ---------------------------------------------------------------------------------------------
# Conversations

def msg(role, content=None, *, name=None, tool_calls=None, tool_call_id=None, omit_content=False):
    m = {"role": role}
    if not omit_content:
        m["content"] = content
    if name is not None:
        m["name"] = name
    if tool_calls is not None:
        m["tool_calls"] = tool_calls
    if tool_call_id is not None:
        m["tool_call_id"] = tool_call_id
    return m


def tool_call(name, arguments, call_id=None):
    call = {}
    if call_id is not None:
        call["id"] = call_id
    call["type"] = "function"
    call["function"] = {"name": name, "arguments": arguments}
    return call


SYSTEM = msg("system", "You are a helpful assistant.")
USER = msg("user", "Hello!")
ASSISTANT = msg("assistant", "Hi! How can I help you today?")
USER2 = msg("user", "What is 2+2?")
ASSISTANT2 = msg("assistant", "2+2 equals 4.")
TRICKY_USER = msg(
    "user",
    "  Héllo «wörld» — 日本語 😀 ñ\n'single' \"double\" \\backslash\t<tag> & {{ not_a_var }} {% raw %}\n\n  ",
)
TRICKY_ASSISTANT = msg("assistant", "\n Ça va? Ünïcödé… 🙂\r\n  trailing spaces   ")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone — «UTC» by default",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}, "precise": {"type": "boolean", "default": False}},
            "required": [],
        },
        "return": {"type": "string"},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
WEATHER_QUESTION = msg("user", "What's the weather like in Paris today?")
WEATHER_CALL = msg(
    "assistant",
    None,
    tool_calls=[tool_call("get_current_weather", {"location": "Paris, France", "unit": "celsius"}, "call12345")],
)
WEATHER_CALL_NO_CONTENT = msg(
    "assistant",
    omit_content=True,
    tool_calls=[tool_call("get_current_weather", {"location": "Paris, France", "unit": "celsius"}, "call12345")],
)
WEATHER_RESULT = msg("tool", '{"temperature": 22, "unit": "celsius"}', tool_call_id="call12345")
WEATHER_ANSWER = msg("assistant", "It is 22 °C in Paris today.")


def chat_cases(template, prefix, conversations, **common):
    cases = []
    for name, spec in conversations.items():
        spec = dict(spec)
        case = {"name": f"{prefix}/{name}", "template": template, "chat": True}
        now = spec.pop("now", None)
        if now:
            case["now"] = now
        variables = {
            "messages": spec.pop("messages"),
            "tools": spec.pop("tools", None),
            "documents": None,
            "add_generation_prompt": spec.pop("add_generation_prompt", True),
            "bos_token": spec.pop("bos_token", common.get("bos_token", "")),
            "eos_token": spec.pop("eos_token", common.get("eos_token", "")),
        }
        variables.update(spec)  # extra keyword arguments
        case["context"] = variables
        cases.append(case)
    return cases


def all_chat_cases():
    cases = []
    basic = {
        "single_user": {"messages": [USER]},
        "system_user": {"messages": [SYSTEM, USER2]},
        "multi_turn": {"messages": [SYSTEM, USER, ASSISTANT, USER2]},
        "multi_turn_no_generation_prompt": {
            "messages": [USER, ASSISTANT, USER2, ASSISTANT2],
            "add_generation_prompt": False,
        },
        "unicode_quotes_whitespace": {"messages": [TRICKY_USER, TRICKY_ASSISTANT, USER2]},
    }
    cases += chat_cases("smollm2-135m-instruct.jinja", "smollm2", basic, eos_token="<|im_end|>")
    cases += chat_cases(
        "smollm2-135m-instruct.jinja",
        "smollm2",
        {"empty_content": {"messages": [msg("user", "")]}, "no_messages": {"messages": []}},
    )

    llama = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    date = {"date_string": "05 Sep 2024"}
    cases += chat_cases(
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "llama3.1",
        {
            "single_user": {"messages": [USER], **date},
            "single_user_default_date": {"messages": [USER]},
            "system_user": {"messages": [SYSTEM, USER2], **date},
            "multi_turn": {"messages": [SYSTEM, USER, ASSISTANT, USER2], **date},
            "multi_turn_no_generation_prompt": {
                "messages": [USER, ASSISTANT, USER2, ASSISTANT2],
                "add_generation_prompt": False,
                **date,
            },
            "unicode_quotes_whitespace": {"messages": [SYSTEM, TRICKY_USER, TRICKY_ASSISTANT, USER2], **date},
            "tools": {"messages": [SYSTEM, WEATHER_QUESTION], "tools": TOOLS, **date},
            "tools_in_system_message": {
                "messages": [SYSTEM, WEATHER_QUESTION],
                "tools": TOOLS,
                "tools_in_user_message": False,
                **date,
            },
            "tool_call_and_result": {
                "messages": [WEATHER_QUESTION, WEATHER_CALL_NO_CONTENT, WEATHER_RESULT, WEATHER_ANSWER],
                "tools": [WEATHER_TOOL],
                "add_generation_prompt": False,
                **date,
            },
            "builtin_tools": {
                "messages": [
                    msg("user", "Search the web for the tallest tower."),
                    msg(
                        "assistant",
                        omit_content=True,
                        tool_calls=[tool_call("brave_search", {"query": "tallest tower"})],
                    ),
                    msg("ipython", {"result": "Burj Khalifa", "height_m": 828}),
                ],
                "builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"],
                **date,
            },
            "error_two_tool_calls": {
                "messages": [
                    WEATHER_QUESTION,
                    msg(
                        "assistant",
                        omit_content=True,
                        tool_calls=[
                            tool_call("get_current_weather", {"location": "Paris"}),
                            tool_call("get_time", {"tz": "CET"}),
                        ],
                    ),
                ],
                **date,
            },
            "error_tools_without_user_message": {"messages": [SYSTEM], "tools": TOOLS, **date},
        },
        **llama,
    )
    cases += chat_cases(
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "llama3.2",
        {
            "single_user_strftime_now": {"messages": [USER]},
            "system_user": {"messages": [SYSTEM, USER2], "now": "2025-01-31T08:00:00"},
            "tool_call_and_result": {
                "messages": [SYSTEM, WEATHER_QUESTION, WEATHER_CALL, WEATHER_RESULT],
                "tools": [WEATHER_TOOL],
            },
        },
        **llama,
    )
    cases += chat_cases(
        "meta-llama-Llama-3.3-70B-Instruct.jinja",
        "llama3.3",
        {
            "multi_turn": {"messages": [SYSTEM, USER, ASSISTANT, USER2], **date},
            "tools": {"messages": [WEATHER_QUESTION], "tools": [WEATHER_TOOL], **date},
        },
        **llama,
    )

    qwen_result2 = msg("tool", "13:37", tool_call_id="call67890")
    cases += chat_cases(
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        "qwen2.5",
        {
            **basic,
            "tools": {"messages": [WEATHER_QUESTION], "tools": TOOLS},
            "tools_with_system": {"messages": [SYSTEM, WEATHER_QUESTION], "tools": TOOLS},
            "tool_calls_and_results": {
                "messages": [
                    SYSTEM,
                    WEATHER_QUESTION,
                    msg(
                        "assistant",
                        "Let me check.",
                        tool_calls=[
                            tool_call("get_current_weather", {"location": "Paris, France"}, "call12345"),
                            {"name": "get_time", "arguments": {"tz": "Europe/Paris"}},
                        ],
                    ),
                    WEATHER_RESULT,
                    qwen_result2,
                    WEATHER_ANSWER,
                    USER2,
                ],
                "tools": TOOLS,
            },
            "system_not_first": {"messages": [USER, msg("system", "Be brief."), USER2]},
        },
        eos_token="<|im_end|>",
    )

    mistral = dict(bos_token="<s>", eos_token="</s>")
    nemo_call = msg(
        "assistant",
        omit_content=True,
        tool_calls=[tool_call("get_current_weather", {"location": "Paris, France", "unit": "celsius"}, "call12345")],
    )
    cases += chat_cases(
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        "mistral-nemo",
        {
            "single_user": {"messages": [USER]},
            "system_user": {"messages": [SYSTEM, USER2]},
            "multi_turn": {"messages": [SYSTEM, USER, ASSISTANT, USER2]},
            "multi_turn_ends_with_assistant": {
                "messages": [USER, ASSISTANT, USER2, ASSISTANT2],
                "add_generation_prompt": False,
            },
            "unicode_quotes_whitespace": {"messages": [TRICKY_USER, TRICKY_ASSISTANT, USER2]},
            "tools_and_tool_call": {
                "messages": [
                    USER,
                    ASSISTANT,
                    WEATHER_QUESTION,
                    nemo_call,
                    msg("tool", {"content": "22 degrees", "extra": [1, 2.5, None, True]}, tool_call_id="call12345"),
                    WEATHER_ANSWER,
                ],
                "tools": TOOLS,
            },
            "error_not_alternating": {"messages": [USER, USER2]},
            "error_bad_tool_call_id": {
                "messages": [
                    WEATHER_QUESTION,
                    msg("assistant", omit_content=True, tool_calls=[tool_call("get_time", {}, "short")]),
                ]
            },
            "error_unknown_role": {"messages": [USER, msg("narrator", "Meanwhile...")]},
        },
        **mistral,
    )
    cases += chat_cases(
        "Mistral-Small-3.2-24B-Instruct-2506.jinja",
        "mistral-small-3.2",
        {
            "single_user_default_system_prompt": {"messages": [USER]},
            "system_user": {"messages": [SYSTEM, USER2], "now": "2025-06-20T10:00:00"},
            "content_parts": {
                "messages": [
                    msg(
                        "user",
                        [
                            {"type": "text", "text": "Describe this image: "},
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        ],
                    ),
                    msg("assistant", [{"type": "text", "text": "A cat."}]),
                    USER2,
                ]
            },
            "tools_and_tool_call": {
                "messages": [SYSTEM, WEATHER_QUESTION, WEATHER_CALL_NO_CONTENT, WEATHER_RESULT, WEATHER_ANSWER],
                "tools": TOOLS,
            },
            "error_not_alternating": {"messages": [SYSTEM, USER, USER2]},
        },
        **mistral,
    )

    gemma = dict(bos_token="<bos>", eos_token="<eos>")
    cases += chat_cases(
        "google-gemma-2-2b-it.jinja",
        "gemma2",
        {
            "single_user": {"messages": [USER]},
            "multi_turn": {"messages": [USER, ASSISTANT, USER2]},
            "multi_turn_no_generation_prompt": {
                "messages": [USER, ASSISTANT, USER2, ASSISTANT2],
                "add_generation_prompt": False,
            },
            "unicode_quotes_whitespace": {"messages": [TRICKY_USER, TRICKY_ASSISTANT, USER2]},
            "error_system_role": {"messages": [SYSTEM, USER]},
            "error_not_alternating": {"messages": [USER, USER2]},
        },
        **gemma,
    )
    phi = dict(bos_token="<s>", eos_token="<|endoftext|>")
    cases += chat_cases(
        "microsoft-Phi-3.5-mini-instruct.jinja",
        "phi3.5",
        {
            **basic,
            "empty_system_is_skipped": {"messages": [msg("system", ""), USER]},
        },
        **phi,
    )
    return cases


# ---------------------------------------------------------------------------------------------
# Small inline templates pinning down one jinja2 behaviour each.

def micro(name, source, **context):
    return {"name": f"jinja/{name}", "source": source, "context": context}


def all_micro_cases():
    m = micro
    return [
        # whitespace control, trim_blocks, lstrip_blocks, trailing newline, raw, comments
        m("trim_blocks", "{% if true %}\nyes\n{% endif %}\nafter\n"),
        m("lstrip_blocks", "  {% if true %}\n    x\n  {% endif %}\n  {{ 'v' }}  {# c #}\n\t{# d #}\nend"),
        m("lstrip_not_after_text", "a {% if true %}b{% endif %} c\n"),
        m("plus_disables_lstrip_and_trim", "  {%+ if true +%}\n  x\n  {%- endif +%}\ny"),
        m("minus_strips_all_whitespace", "a  \n\t {{- 'b' -}} \n\n c {%- if true -%}\n\n d \n{%- endif %}"),
        m("minus_strips_unicode_space", "a\u3000\u00a0{{- 'b' -}}\u2003\nc"),
        m("crlf_source_newlines", "line1\r\n{% if true %}\r\nx\r\n{% endif %}\r\nend\r\n"),
        m("keeps_one_of_two_trailing_newlines", "text\n\n"),
        m("raw_block", "{% raw %}\n{{ not rendered }} {% if %}{% endraw %}\n!"),
        m("comment_trim", "a\n{# comment #}\nb\n  {#- x -#}  \nc"),
        m("variable_end_no_trim", "{{ 'x' }}\n{{ 'y' }}\n"),
        m("strip_dash_in_variable_begin", "a {{-1}} b"),
        # literals and printing
        m("print_values", "{{ none }}|{{ true }}|{{ False }}|{{ 42 }}|{{ -7 }}|{{ 1.0 }}|{{ 0.1 + 0.2 }}|{{ 1e16 }}|{{ 1e15 }}|{{ 1e-5 }}|{{ 0.0001 }}|{{ 2.5e-300 }}"),
        m("print_containers", "{{ [1, 'a', none, true, 2.5, [], {}] }}|{{ {'k': 'v', 'n': {'x': none}} }}|{{ (1,) }}|{{ (1, 'b') }}|{{ () }}"),
        m("print_string_repr", "{{ ['it\\'s', \"say \\\"hi\\\"\", 'both \\' \"', 'tab\\there\\n', 'back\\\\slash', '\\x01\\x7f\\xa0\\u200b\\u2028é😀'] }}"),
        m("string_escapes", "{{ 'a\\tb\\\\c\\x41\\u00e9\\U0001F600\\101\\q' }}"),
        m("adjacent_strings", "{{ 'a' \"b\" 'c' }}"),
        m("print_tuple_expression", "{{ 1, 'two' }}"),
        m("integer_literals", "{{ 0x1F }} {{ 0o17 }} {{ 0b101 }} {{ 1_000 }} {{ 2.5e3 }}"),
        # operators
        m("arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 6 / 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 'ab' * 3 }} {{ 1 + 1.0 }} {{ true + 1 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ [1] * 2 }} {{ [1] + [2] }}"),
        m("concat_tilde", "{{ 'a' ~ 1 ~ none ~ true ~ [1] ~ undefined_thing }}"),
        m("and_or_values", "{{ none or 'x' }}|{{ 0 and 1 }}|{{ 'a' and 'b' }}|{{ [] or {} }}|{{ not [] }}|{{ not 'x' }}"),
        m("comparisons", "{{ 1 == 1.0 }}{{ 1 == true }}{{ (1, 2) == [1, 2] }}{{ 'a' < 'b' }}{{ [1, 2] < [1, 3] }}{{ 1 < 2 < 3 }}{{ 3 > 2 > 2 }}{{ {'a': 1, 'b': 2} == {'b': 2, 'a': 1} }}{{ none == none }}{{ x == y }}{{ x == none }}"),
        m("in_operator", "{{ 'a' in 'cat' }}{{ 2 in [1, 2] }}{{ 'k' in {'k': 1} }}{{ 'z' not in {'k': 1} }}{{ 'a' in undefined_thing }}{{ 1.0 in [1] }}"),
        m("conditional_expression", "{{ 'y' if true else 'n' }}|{{ 'y' if false }}|{{ 'a' if false else 'b' if true else 'c' }}"),
        m("unary", "{{ -(3) }} {{ +4 }} {{ -1|abs }} {{ not true == false }}"),
        m("filter_binds_tighter_than_plus", "{{ 'a' + ' b '|trim + 'c' }}"),
        # variables, undefined, attribute and item access
        m("undefined_prints_empty", "[{{ missing }}][{{ missing|length }}][{{ missing|trim }}][{{ missing is defined }}][{{ missing|default('dflt') }}]"),
        m("dict_attribute_and_item", "{{ d.a }}|{{ d['a'] }}|{{ d.missing }}|{{ d['missing'] }}|{{ d.get('a') }}|{{ d.get('missing', 'z') }}|{{ d.get('missing') }}|{{ d['items'] }}|{{ d.items is callable }}|{{ d.get is defined }}", d={"a": 1, "items": "shadowed"}),
        m("list_and_string_indexing", "{{ l[0] }}{{ l[-1] }}{{ l[9] }}|{{ s[0] }}{{ s[-1] }}{{ s[1:3] }}{{ s[::-1] }}{{ l[1:] }}{{ l[:-1] }}{{ l[::2] }}{{ s[5:1:-2] }}", l=[1, 2, 3], s="héllo wörld"),
        m("attribute_of_none_is_undefined", "[{{ none.x }}][{{ n.field }}]", n=None),
        m("error_attribute_of_undefined", "{{ missing.attr }}"),
        m("error_add_undefined", "{{ missing + 1 }}"),
        m("error_division_by_zero", "{{ 1 / 0 }}"),
        m("error_str_plus_int", "{{ 'a' + 1 }}"),
        m("error_compare_str_int", "{{ 'a' < 1 }}"),
        # control structures and scoping
        m("if_elif_else", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %};{% endfor %}"),
        m("set_in_loop_does_not_leak", "{% set x = 0 %}{% for i in range(3) %}{{ x }}{% set x = x + 1 %}{{ x }};{% endfor %}{{ x }}"),
        m("set_in_if_is_visible", "{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}"),
        m("namespace_counter", "{% set ns = namespace(n=0, s='') %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }} {{ ns }}"),
        m("loop_variables", "{% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('x', 'y') }}{{ loop.depth }};{% endfor %}"),
        m("loop_filter_and_else", "{% for x in [1, 2, 3, 4] if x is even %}{{ x }}/{{ loop.index }}/{{ loop.length }}/{{ loop.last }};{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}"),
        m("loop_unpacking_and_dicts", "{% for k, v in {'a': 1, 'b': [2]}.items() %}{{ k }}={{ v }};{% endfor %}{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}{% for c in 'hé' %}[{{ c }}]{% endfor %}"),
        m("nested_loops", "{% for i in [1, 2] %}{% for j in 'ab' %}{{ loop.index }}{{ i }}{{ j }} {% endfor %}{{ loop.index }};{% endfor %}"),
        m("break_continue", "{% for x in range(10) %}{% if x is odd %}{% continue %}{% endif %}{% if x > 6 %}{% break %}{% endif %}{{ x }}{% endfor %}"),
        m("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', punct='?') }} {{ greet(punct='.', name='Cy') }} {{ greet }}"),
        m("macro_sees_later_globals", "{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}"),
        m("macro_varargs_kwargs", "{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k='v') }}"),
        m("set_block_and_filter_block", "{% set body %}\n  Hello {{ 'World' }}\n{% endset %}[{{ body }}]{% filter upper %}shout {{ 'it' }}{% endfilter %}{% set t | trim %}  pad  {% endset %}[{{ t }}]"),
        m("with_block", "{% set a = 1 %}{% with a = 2, b = 3 %}{{ a }}{{ b }}{% endwith %}{{ a }}{{ b }}"),
        m("set_tuple_unpacking", "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c, d = [3, 4] %}{{ c }}{{ d }}"),
        m("generation_block", "{% generation %}inside{% endgeneration %}"),
        m("raise_exception", "before{{ raise_exception('Custom failure: ' ~ 42) }}"),
        # filters
        m("string_filters", "{{ '  pad  '|trim }}|{{ 'xxhixx'|trim('x') }}|{{ 'hello world'|title }}|{{ \"they're bill's-friend (ok)\"|title }}|{{ 'aBC dEF'|capitalize }}|{{ 'MiXed'|upper }}{{ 'MiXed'|lower }}|{{ 'a-b-c'|replace('-', '+') }}|{{ 'aaa'|replace('a', 'b', 2) }}|{{ 42|string }}|{{ 'abc'|reverse }}|{{ 'hello world foo'|wordcount }}|{{ 'abc'|center(9) }}|"),
        m("indent_filter", "[{{ 'a\\nb\\n\\nc'|indent }}][{{ 'a\\nb'|indent(2, true) }}][{{ 'a\\n\\nb\\n'|indent(2, blank=true) }}][{{ 'x\\ny'|indent('> ') }}]"),
        m("length_first_last_join", "{{ [1, 2, 3]|length }}{{ 'héllo'|length }}{{ {'a': 1}|count }}|{{ [1, 2, 3]|first }}{{ [1, 2, 3]|last }}{{ 'abc'|first }}{{ 'abc'|last }}[{{ []|first }}]|{{ [1, 2, 3]|join(', ') }}|{{ ['a', 'b']|join }}|{{ [{'n': 'x'}, {'n': 'y'}]|join(',', attribute='n') }}"),
        m("default_filter", "{{ missing|default('d') }}{{ none|default('d') }}{{ ''|default('d') }}{{ ''|default('d', true) }}{{ 0|d('z', boolean=true) }}"),
        m("number_filters", "{{ 3.7|int }} {{ '42'|int }} {{ '42.5'|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ '0x1A'|int(0, 16) }} {{ '12'|float }} {{ 'x'|float }} {{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 2.1|round(0, 'ceil') }} {{ 2.9|round(method='floor') }} {{ 5|round }} {{ -3|abs }} {{ [1, 2.5, 3]|sum }} {{ [3, 1, 2]|min }} {{ [3, 1, 2]|max }} {{ 1234.5|round(-2) }}"),
        m("list_filters", "{{ [3, 1, 2]|sort }} {{ ['b', 'A', 'c']|sort }} {{ ['b', 'A', 'c']|sort(case_sensitive=true) }} {{ [3, 1, 2]|sort(reverse=true) }} {{ [1, 2, 1, 3]|unique|list }} {{ [1, 2, 3]|reverse|list }} {{ 'ab'|list }} {{ {'a': 1, 'b': 2}|list }} {{ [1, 2, 3, 4, 5]|batch(2)|list }} {{ {'b': 1, 'a': 2}|dictsort }} {{ {'a': 1}|items|list }}"),
        m("select_reject_map", "{{ [1, 2, 3, 4]|select('odd')|list }} {{ [1, 2, 3, 4]|reject('odd')|list }} {{ [0, 1, '', 'a', none]|select|list }} {{ users|selectattr('active')|map(attribute='name')|list }} {{ users|rejectattr('name', 'equalto', 'bo')|map(attribute='name')|join(',') }} {{ ['a', 'b']|map('upper')|list }} {{ users|map(attribute='age', default=0)|list }} {{ users|selectattr('name', 'in', ['al', 'cy'])|list|length }}", users=[{"name": "al", "active": True, "age": 30}, {"name": "bo", "active": False}, {"name": "cy", "active": True, "age": 41}]),
        m("generators_are_single_use", "{% set evens = [1, 2, 3, 4]|select('even') %}{{ evens|list }}{{ evens|list }}{% if [1]|select('odd') %}truthy{% endif %}{% if []|select %}always{% endif %}"),
        m("tojson_filter", "{{ data|tojson }}|{{ data|tojson(indent=2) }}|{{ 'é\"\\\\\\n\\u2028'|tojson }}|{{ 'é😀'|tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': [1, 2]}|tojson(sort_keys=true, separators=(',', ':')) }}|{{ [1, (2, 3)]|tojson }}|{{ [[], {}]|tojson(indent=4) }}", data={"name": "x", "list": [1, 2.5, None, True, False, "s"], "nested": {"k": {}}}),
        m("escape_and_safe", "{{ '<a href=\"x\">&\\'</a>'|e }}|{{ '<b>'|safe }}|{{ ('<b>'|safe) + '<i>' }}|{{ '<i>' + ('<b>'|safe) }}|{{ '<b>'|escape|escape }}"),
        m("format_and_percent", "{{ '%s-%s'|format('a', 1) }}|{{ 'x=%d' % 42 }}|{{ '%s and %s' % ('a', none) }}|{{ '{} {}'.format(1, 'b') }}|{{ '{0}{1}{0}'.format('a', 'b') }}|{{ '{name}!'.format(name='Bo') }}|{{ '%.2f' % 3.14159 }}|{{ '100%%' % () }}"),
        m("attr_filter", "{{ d|attr('a') }}|{{ d|attr('keys') is defined }}", d={"a": 1}),
        # tests
        m("tests", "{{ 1 is odd }}{{ 2 is even }}{{ 9 is divisibleby 3 }}{{ none is none }}{{ true is boolean }}{{ 1 is boolean }}{{ true is true }}{{ 1 is true }}{{ 0 is false }}{{ 1 is integer }}{{ true is integer }}{{ 1.0 is float }}{{ 1 is number }}{{ true is number }}{{ 'a' is string }}{{ {} is mapping }}{{ [] is sequence }}{{ 'a' is sequence }}{{ {} is sequence }}{{ missing is sequence }}{{ none is sequence }}{{ 'a' is iterable }}{{ 5 is iterable }}{{ missing is iterable }}{{ 'abc' is lower }}{{ 'ABC' is upper }}{{ 'aB' is lower }}{{ 3 is in [1, 3] }}{{ 'x' is eq 'x' }}{{ 2 is gt 1 }}{{ 2 is le 1 }}{{ none is sameas none }}{{ 1 is sameas true }}{{ range is callable }}{{ 'a' is escaped }}{{ 'a'|e is escaped }}{{ missing is undefined }}{{ 'x' is not none }}"),
        # str / dict / list methods
        m("string_methods", "[{{ '  a b  '.strip() }}][{{ 'xxaxx'.strip('x') }}][{{ '  a'.lstrip() }}][{{ 'a  '.rstrip() }}]{{ 'a,b,,c'.split(',') }}{{ ' a  b '.split() }}{{ 'a b c'.split(' ', 1) }}{{ 'a b c'.rsplit(' ', 1) }}{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith(('x', 'c')) }}{{ 'aBc'.upper() }}{{ 'aBc'.lower() }}{{ \"they're\".title() }}{{ 'hello World'.capitalize() }}{{ 'aaa'.replace('a', 'b') }}{{ 'abcabc'.find('c') }}{{ 'abcabc'.rfind('c') }}{{ 'abc'.find('z') }}{{ 'abcabc'.count('bc') }}{{ '-'.join(['x', 'y']) }}{{ 'a\\nb\\r\\nc'.splitlines() }}{{ '42'.isdigit() }}{{ 'ab'.isalpha() }}{{ 'pre_x'.removeprefix('pre_') }}{{ 'x.py'.removesuffix('.py') }}{{ 'a=b=c'.partition('=') }}{{ 'ab'.zfill(4) }}{{ 'ab'.ljust(4) }}|{{ 'ab'.rjust(4, '*') }}"),
        m("dict_and_list_methods", "{{ d.keys()|list }}{{ d.values()|list }}{{ d.items()|list }}{{ d.keys() }}{{ d.items() }}{{ d.copy() }}{{ l.index(2) }}{{ l.count(1) }}", d={"a": 1, "b": 2}, l=[1, 2, 1]),
        m("error_list_append_is_unsafe", "{% set l = [] %}{{ l.append(1) }}"),
        # globals
        m("range_and_dict_globals", "{{ range(3)|list }}{{ range(1, 10, 3)|list }}{{ range(5, 0, -2)|list }}{{ range(3) }}{{ range(3)|length }}{{ dict(a=1, b='x') }}"),
        m("strftime_now", "{{ strftime_now('%Y-%m-%d %H:%M:%S %d %b %Y %A %a %B %j %p %I %y %%') }}"),
        # corner cases found by differential fuzzing against jinja2
        m("percent_with_list_and_undefined", "[{{ 'A b' % [] }}][{{ '%s' % missing }}][{{ 'x' % missing }}][{{ '%s' % [1, 2] }}]"),
        m("error_slice_of_int", "{{ n[1:] }}", n=7),
        m("error_slice_of_dict", "{{ d[1:] }}", d={"a": 1}),
        m("truncate_sized_values", "{{ [1, 2]|truncate(5) }}|{{ {'a': 1}|truncate(5) }}|{{ 'a long sentence here'|truncate(12, leeway=0) }}"),
        m("generator_errors_are_lazy", "{{ 'x' not in [1.5|items] }}{% if 5|select %}truthy{% endif %}"),
        m("unclosed_comment_at_end", "text {#"),
        m("unclosed_comment_dash_at_end", "text  {#-"),
        m("unicode_digits_and_spaces", "{{ '\u0663'|int }} {{ '\u00a0\u0661\u0662 '|int }} {{ '\u0663.5'|float }} {{ '\u0663'.isdigit() }} {{ '\u00b2'.isdigit() }} {{ '\u00b2'.isdecimal() }}"),
        m("tojson_ensure_ascii_del", "{{ '\x7f\x1f'|tojson(ensure_ascii=true) }}{{ '\x7f'|tojson }}"),
        m("int_true_division_is_exact", "{{ 9007199254740993 / 3 }} {{ -0.5|round(0, 'ceil') }}"),
        m("unicode_whitespace_between_tokens", "{{ 'a'\u2028~\u3000'b' }}"),
        # unicode case tables and printability
        m("unicode_upper_lower", "{{ s|upper }}|{{ s|lower }}|{{ s.title() }}|{{ s|capitalize }}|{{ s.lower().title() }}|{{ s.islower() }}{{ s.lower().islower() }}{{ s.upper().isupper() }}", s="ßtraße ǆemal ﬁne ΣΑΣ ὈΔΥΣΣΕΎΣ İstanbul ǅ Ω ŉ ÿ Ⓐⓑ 𐐀𐐨 ǰ ΐ"),
        m("unicode_case_all", "{{ up|upper == upper_expected }}{{ lo|lower == lower_expected }}{{ up|upper }}{{ lo|lower }}", **_unicode_case_context()),
        m("unicode_repr_all", "{{ chars }}", chars=_unicode_repr_sample()),
        m("unicode_isspace_trim", "[{{ ws|trim }}][{{ ws.split() }}]", ws="\u0085\u00a0\u1680\u2000a\u2028b\u3000\u001c\u000b"),
    ]


def _unicode_case_context():
    up = "".join(chr(c) for c in range(0x110000) if chr(c).upper() != chr(c))
    lo = "".join(chr(c) for c in range(0x110000) if chr(c).lower() != chr(c))
    return {"up": up, "lo": lo, "upper_expected": up.upper(), "lower_expected": lo.lower()}


def _unicode_repr_sample():
    # Both ends of every printable / non-printable run, so that the table boundaries are pinned.
    chars = []
    prev = None
    for c in range(0x110000):
        p = chr(c).isprintable()
        if p != prev:
            if c > 0:
                chars.append(chr(c - 1))
            chars.append(chr(c))
            prev = p
    chars = [ch for ch in chars if not 0xD800 <= ord(ch) <= 0xDFFF]  # JSON cannot carry lone surrogates
    return "".join(chars)


# ---------------------------------------------------------------------------------------------

def render_case(case):
    now = datetime.datetime.fromisoformat(case.get("now", DEFAULT_NOW))
    env = make_environment(now)
    if "template" in case:
        source = (TEMPLATE_DIR / case["template"]).read_text(encoding="utf-8")
    else:
        source = case["source"]
    try:
        rendered = env.from_string(source).render(**case["context"])
    except Exception as e:  # every failure is recorded; the C++ side must fail too
        return {"error": {"type": type(e).__name__, "message": str(e)}}
    return {"expected": rendered}


def generate():
    cases = all_chat_cases() + all_micro_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    out_cases = []
    for case in cases:
        case = dict(case)
        case.setdefault("now", DEFAULT_NOW)
        case.update(render_case(case))
        out_cases.append(case)
    doc = {
        "generator": "tools/reference/gen_chat_template_fixtures.py",
        "jinja2_version": jinja2.__version__,
        "python_version": sys.version.split()[0],
        "environment": "ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, "
        "extensions=[generation, loopcontrols]); tojson=json.dumps(ensure_ascii=False, indent, "
        "separators, sort_keys); raise_exception; strftime_now at the case's 'now'",
        "cases": out_cases,
    }
    FIXTURES.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    num_errors = sum(1 for c in out_cases if "error" in c)
    num_chat = sum(1 for c in out_cases if c.get("chat"))
    templates = sorted({c["template"] for c in out_cases if "template" in c})
    print(
        f"wrote {FIXTURES.relative_to(ROOT)}: {len(out_cases)} cases ({num_chat} chat cases over "
        f"{len(templates)} templates, {num_errors} expected errors)"
    )


# ---------------------------------------------------------------------------------------------
# Unicode tables for src/tokenizer/jinja.cpp

def _utf8_literal(s):
    return '"' + "".join(f"\\{b:03o}" for b in s.encode("utf-8")) + '"'


def _map_ranges(fn):
    # (first, last, delta, stride): every stride-th code point from first to last maps to itself
    # plus delta. Only one-code-point results; longer ones go to the special tables.
    out = []
    for c in range(0x110000):
        r = fn(chr(c))
        if len(r) != 1 or r == chr(c):
            continue
        d = ord(r) - c
        if out:
            first, last, dd, stride = out[-1]
            if dd == d and ((stride in (0, 1) and c == last + 1) or (stride in (0, 2) and c == last + 2)):
                out[-1] = (first, c, d, c - last if stride == 0 else stride)
                continue
        out.append((c, c, d, 0))
    return [(a, b, d, s or 1) for a, b, d, s in out]


def _set_ranges(pred):
    out = []
    for c in range(0x110000):
        if not pred(c):
            continue
        if out:
            first, last, stride = out[-1]
            if (stride in (0, 1) and c == last + 1) or (stride in (0, 2) and c == last + 2):
                out[-1] = (first, c, c - last if stride == 0 else stride)
                continue
        out.append((c, c, 0))
    return [(a, b, s or 1) for a, b, s in out]


def _emit_rows(lines, entries, width=100):
    row = "   "
    for entry in entries:
        if len(row) + 1 + len(entry) > width:
            lines.append(row)
            row = "   "
        row += " " + entry
    if row.strip():
        lines.append(row)


def emit_unicode_tables():
    lines = [
        "// clang-format off",
        f"// Generated by tools/reference/gen_chat_template_fixtures.py --unicode-tables from Python "
        f"{sys.version.split()[0]} (Unicode {unicodedata.unidata_version}).",
    ]

    def emit_map(name, fn):
        lines.append(f"constexpr CaseRange {name}[] = {{")
        _emit_rows(lines, [f"{{0x{a:X}, 0x{b:X}, {d}, {s}}}," for a, b, d, s in _map_ranges(fn)])
        lines.append("};")

    def emit_special(name, fn, keep):
        lines.append(f"constexpr SpecialCase {name}[] = {{")
        for c in range(0x110000):
            r = fn(chr(c))
            if keep(chr(c), r):
                lines.append(f"    {{0x{c:X}, {_utf8_literal(r)}}},")
        lines.append("};")

    def emit_set(name, pred):
        lines.append(f"constexpr SetRange {name}[] = {{")
        _emit_rows(lines, [f"{{0x{a:X}, 0x{b:X}, {s}}}," for a, b, s in _set_ranges(pred)])
        lines.append("};")

    emit_map("kUpperRanges", str.upper)
    emit_map("kLowerRanges", str.lower)
    emit_special("kUpperSpecial", str.upper, lambda ch, r: len(r) > 1)
    emit_special("kLowerSpecial", str.lower, lambda ch, r: len(r) > 1)
    # Title case where it differs from upper case (str.title, str.capitalize).
    emit_special("kTitleSpecial", str.title, lambda ch, r: r != ch.upper())
    emit_set("kLowercase", lambda c: chr(c).islower())
    emit_set("kUppercase", lambda c: chr(c).isupper())
    emit_set("kTitlecase", lambda c: unicodedata.category(chr(c)) == "Lt")
    # Cased, Case_Ignorable: what str.lower() needs for the final sigma rule and str.title()
    # for word boundaries.
    emit_set("kCased", lambda c: chr(c).islower() or chr(c).isupper() or unicodedata.category(chr(c)) == "Lt")
    emit_set("kCaseIgnorable", _is_case_ignorable)
    emit_set("kNonPrintable", lambda c: not chr(c).isprintable())
    # Decimal digits come in runs of ten starting at a zero, so a digit's value is
    # (code point - first of its range) % 10; int() and float() accept them.
    for first, last, stride in _set_ranges(lambda c: chr(c).isdecimal()):
        assert stride == 1 and (last - first + 1) % 10 == 0 and unicodedata.decimal(chr(first)) == 0
    emit_set("kDecimal", lambda c: chr(c).isdecimal())
    emit_set("kDigit", lambda c: chr(c).isdigit())
    lines.append("// clang-format on")
    print("\n".join(lines))


def _is_case_ignorable(c):
    # Unicode Case_Ignorable: Mn, Me, Cf, Lm, Sk, or Word_Break MidLetter/MidNumLet/Single_Quote.
    cat = unicodedata.category(chr(c))
    return cat in ("Mn", "Me", "Cf", "Lm", "Sk") or c in (
        0x27, 0x2E, 0x3A, 0xB7, 0x387, 0x55F, 0x5F4, 0x2018, 0x2019, 0x2024, 0x2027, 0xFE13, 0xFE52,
        0xFE55, 0xFF07, 0xFF0E, 0xFF1A,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unicode-tables", action="store_true", help="print the C++ Unicode tables instead")
    args = parser.parse_args()
    if args.unicode_tables:
        emit_unicode_tables()
    else:
        generate()


if __name__ == "__main__":
    main()
