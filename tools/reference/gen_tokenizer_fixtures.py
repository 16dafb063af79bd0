#!/usr/bin/env python3
"""Regenerates tests/golden/data/tokenizer_smollm2.json with llama.cpp (the reference).

    source tools/reference/env.sh && python tools/reference/gen_tokenizer_fixtures.py

Loads the default model's vocabulary (models/SmolLM2-135M-Instruct.Q4_1.gguf, vocab_only) into
llama.cpp through the llama-cpp-python binding's low-level API and records, for every string of
the corpus below:

  ids_special      llama_tokenize(add_special=False, parse_special=True)
  ids_plain        llama_tokenize(add_special=False, parse_special=False)
  ids_add_special  llama_tokenize(add_special=True,  parse_special=True)
  detok_special    llama_detokenize(ids_special, remove_special=False, unparse_special=True)
  detok_plain      llama_detokenize(ids_special, remove_special=True,  unparse_special=False)

and, for the vocabulary: size, BOS/EOS, the add_bos/add_eos flags, every end-of-generation id
(llama_vocab_is_eog over all ids), and FNV-1a hashes over every token's piece
(llama_token_to_piece, special on and off) and attributes (llama_vocab_get_attr).
Text that is not valid UTF-8 is stored hex-encoded under "<field>_hex".
tests/golden/tokenizer_golden_test.cpp checks pdserve's tokenizer against all of it.

SmolLM2 only exercises the "smollm" pre-tokenizer, so the script also derives vocab-only GGUF
variants from the model (in a temporary directory), loads each into llama.cpp and writes
tests/golden/data/tokenizer_variants.json with the same vocabulary facts and, per corpus
string, the FNV-1a hashes (64-bit, hex) of the five results above in that order (id lists
hashed as their decimal ids joined by commas). The variants (rebuilt identically by the C++
test from the model's own metadata):

  bpe_llama_bpe  tokenizer.ggml.pre = "llama-bpe", tokenizer.ggml.add_bos_token removed
  bpe_qwen2      tokenizer.ggml.pre = "qwen2"
  bpe_gpt2       tokenizer.ggml.pre = "gpt-2"
  bpe_default    tokenizer.ggml.pre = "default"
  spm            a SentencePiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte
                 tokens <0xXX>, then, in id order, every control / user-defined token of SmolLM2
                 and every normal token whose bytes are valid UTF-8 (spaces written as U+2581,
                 score = -its SmolLM2 id), skipping texts already present; no merges, no pre,
                 bos/eos/unk = 1/2/0 and the add_* flags at their defaults.
"""

import ctypes
import json
import pathlib
import random
import sys
import tempfile

import llama_cpp

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests" / "golden" / "data" / "tokenizer_smollm2.json"
OUT_VARIANTS = ROOT / "tests" / "golden" / "data" / "tokenizer_variants.json"
FNV_BASIS = 14695981039346656037


def chat(*turns, generation_prompt=True):
    """Renders messages the way SmolLM2's chat template does."""
    out = ""
    for role, content in turns:
        out += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    if generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def corpus():
    """(name, bytes) pairs."""
    cases = []

    def add(name, text):
        cases.append((name, text.encode("utf-8") if isinstance(text, str) else text))

    # --- trivial ---
    add("empty", "")
    add("single_space", " ")
    add("single_letter", "a")
    add("single_newline", "\n")
    add("single_tab", "\t")
    # --- ASCII prose ---
    add("hello_world", "Hello world")
    add("pangram", "The quick brown fox jumps over the lazy dog.")
    add("question", "Hello, world! How are you today?")
    add("paragraph", "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.")
    add("leading_space", " leading space")
    add("trailing_space", "trailing space ")
    add("two_leading_spaces", "  two leading spaces")
    add("spaces_between", "multiple   spaces    between     words")
    add("mixed_case", "iPhone McDonald's eBay NASA's HTTPServer camelCaseWord snake_case_word")
    add("sentence_punct", "Wait... what?! No -- really; (yes) [maybe] {never}.")
    # --- contractions ---
    add("contractions_lower", "I'm sure you're right; he's done, we've seen, they'll go, she'd say, don't, can't")
    add("contractions_upper", "I'M SURE YOU'RE RIGHT; HE'S DONE, WE'VE SEEN, THEY'LL GO, SHE'D SAY, DON'T")
    add("contractions_mixed", "It'S you'Re we'VE they'Ll I'm She'D")
    add("contractions_bare", "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D")
    add("apostrophes", "rock 'n' roll, 'twas O'Neil's ''quoted'' it''s")
    add("curly_apostrophe", "it\u2019s \u2018quoted\u2019 \u201cdouble\u201d")
    # --- Latin and other scripts ---
    add("accents_nfc", "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00e0 la cr\u00e8me br\u00fbl\u00e9e")
    add("accents_nfd", "cafe\u0301 nai\u0308ve re\u0301sume\u0301 a\u0300 la cre\u0300me")
    add("combining_stack", "a\u0300\u0301\u0302\u0303\u0304 e\u0327\u0328")
    add("zalgo", "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036bg\u030c\u0317\u035a\u031a")
    add("german", "Stra\u00dfe GR\u1e9eE \u00c4pfel \u00d6l \u00dcbel")
    add("angstrom", "\u00c5ngstr\u00f6m \u212bngstr\u00f6m \u00c5NGSTR\u00d6M")
    add("turkish", "\u0130stanbul \u0131\u015f\u0131k I\u0130 \u0131i")
    add("greek", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03b1\u03b2\u03b3 \u03a3\u03c3\u03c2")
    add("cyrillic", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0401\u0436\u0438\u043a")
    add("vietnamese", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u")
    add("polish", "Za\u017c\u00f3\u0142\u0107 g\u0119\u015bl\u0105 ja\u017a\u0144")
    # --- emoji ---
    add("emoji_single", "\U0001F600")
    add("emoji_skin_tone", "\U0001F44D\U0001F3FD")
    add("emoji_zwj_family", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466")
    add("emoji_rainbow_flag", "\U0001F3F3\ufe0f\u200d\U0001F308")
    add("emoji_flags", "\U0001F1FA\U0001F1F8\U0001F1EB\U0001F1F7\U0001F1EF\U0001F1F5")
    add("emoji_heart_vs16", "\u2764\ufe0f \u2764")
    add("emoji_keycap", "1\ufe0f\u20e3 #\ufe0f\u20e3")
    add("emoji_in_text", "Party time \U0001F389 with friends \U0001F389\U0001F389 and cake \U0001F382!")
    add("emoji_new", "\U0001FAE8 \U0001FA77 \U0001FAAD")  # Unicode 15 emoji
    # --- CJK ---
    add("chinese", "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002")
    add("japanese", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u30ab\u30bf\u30ab\u30ca\u3068"
        "\u3072\u3089\u304c\u306a\u3002")
    add("korean", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4")
    add("cjk_mixed", "\u4e2d\u6587English\u6df7\u5408123\u6570\u5b57")
    add("cjk_ext_b", "\U00020000\U0002A6D6")
    add("cjk_ext_h_unicode15", "\U00031350\U00031351 \U00031352")
    add("fullwidth", "\uff21\uff22\uff23\uff11\uff12\uff13\uff01")
    # --- RTL and Indic ---
    add("arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645")
    add("hebrew", "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd")
    add("arabic_digits", "\u0627\u0644\u0639\u062f\u062f \u0661\u0662\u0663 \u0648 456")
    add("devanagari", "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e \u0967\u0968\u0969")
    add("thai", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01")
    add("tamil", "\u0bb5\u0ba3\u0b95\u0bcd\u0b95\u0bae\u0bcd")
    add("kawi_unicode15", "\U00011F04\U00011F05\U00011F06 \U00011F50\U00011F51")
    add("kaktovik_numerals", "\U0001D2C0\U0001D2C1\U0001D2C2")
    add("unicode15_letters_in_words", "x\U00031350y a\U00011F04b \U0001E4D0q \U0002EBF0z")
    add("unicode15_numbers_in_digits", "1\U0001D2C02 x\U0001E4F0\U0001E4F1 \U00011F509")
    add("unicode15_punctuation", "a\U00011B00b!\U00011F43?")
    # --- symbols and numbers ---
    add("math_symbols", "\u2211\u222b\u221a\u221e \u2264 \u2265 \u2260 \u00b1 \u00d7 \u00f7")
    add("number_forms", "\u00bd \u00be \u00b2 \u00b3 \u216b \u2460\u2461\u2462")
    add("currency", "$100 \u20ac200 \u00a3300 \u00a5400 \u20b9500 \u20bf0.5")
    for n in range(1, 21):
        add(f"digits_{n}", "".join(str((i * 7 + 3) % 10) for i in range(n)))
    add("digits_in_text", "I have 3 apples, 42 oranges and 1234567 grapes.")
    add("digits_commas", "1,234,567,890")
    add("digits_decimal", "3.14159265358979 0.000001 -42 +1e10")
    add("digits_mixed", "1,234.56 12.34.56 2024-01-15 12:30:45 v1.2.3")
    add("phone", "+1 (555) 123-4567")
    add("money", "$1,000,000.00 and 50% off")
    add("space_digits", " 1 22 333 4444 55555")
    # --- whitespace ---
    add("ws_long_spaces", " " * 50)
    add("ws_spaces_then_word", " " * 17 + "word")
    add("ws_word_spaces_word", "x" + " " * 17 + "y")
    add("ws_newlines", "\n" * 20)
    add("ws_mix", "\t \t \n \r\n  \n\n  \t\t x")
    add("ws_line_endings", "line1\nline2\r\nline3\rline4\n\nline6")
    add("ws_trailing_newline", "text\n")
    add("ws_space_newline", " \n")
    add("ws_tabs_code", "\tif x:\n\t\treturn y\n")
    add("ws_indented", "    four\n        eight\n            twelve")
    add("ws_unicode_spaces", "a\u00a0b\u2003c\u3000d\u2009e\u202ff")
    add("ws_nel_ls_ps", "a\u0085b\u2028c\u2029d")
    add("ws_zero_width", "a\u200bb\u200cc\u200dd\u2060e\ufeff")
    add("ws_mongolian_vs", "a\u180eb")
    add("ws_vertical_tab_ff", "a\x0bb\x0cc")
    add("ws_many_mixed", " \u3000 \u00a0\t\n")
    # --- code ---
    add("python", "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "print(f\"{fib(10)=}\")  # 55\n")
    add("cpp", "template <typename T>\nstd::vector<T> f(const std::vector<T>& v) {\n"
        "  for (auto it = v.begin(); it != v.end(); ++it) { *it <<= 2; }\n  return v; // done\n}\n")
    add("json", "{\"name\": \"pdserve\", \"version\": [0, 1, 0], \"ok\": true, "
        "\"nested\": {\"a\": null, \"b\": -1.5e-3}}")
    add("shell", "for f in *.txt; do echo \"$f\" | grep -E '^[a-z]+$' >> out.log 2>&1; done")
    add("html", "<div class=\"x\"><p>Hello &amp; welcome</p><br/></div>")
    add("regex", r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@\d{1,3}\.\w+$")
    add("sql", "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;")
    add("markdown", "# Title\n\n- item **bold** _it_\n- `code`\n\n```python\nx = 1\n```\n")
    add("latex", r"\frac{a}{b} + \sum_{i=0}^{n} x_i^2 = \int_0^\infty e^{-x} dx")
    # --- special-token-looking text ---
    add("st_im_start", "<|im_start|>")
    add("st_im_end", "<|im_end|>")
    add("st_endoftext", "<|endoftext|>")
    add("st_turn", "<|im_start|>user\nHello<|im_end|>\n")
    add("st_partial_1", "<|im_sta")
    add("st_partial_2", "<|im_start")
    add("st_partial_3", "|im_start|>")
    add("st_partial_4", "<|im_end|")
    add("st_nested", "<<|im_start|>|im_end|>>")
    add("st_adjacent", "<|im_start|><|im_end|><|endoftext|>")
    add("st_repeated", "<|endoftext|><|endoftext|> <|endoftext|>")
    add("st_in_text", "text<|endoftext|>more text<|im_end|>end")
    add("st_upper", "<|IM_START|> <|Im_End|>")
    add("st_spaced", "< |im_start| > <| im_end |>")
    add("st_starcoder", "<fim_prefix>def f():<fim_suffix>\n<fim_middle>")
    add("st_repo", "<reponame>pdserve<filename>main.cpp<gh_stars>100")
    add("st_jupyter", "<jupyter_start><jupyter_code>x=1<jupyter_output>1<empty_output>")
    add("st_whitespace_around", "  <|im_start|>  user  <|im_end|>  ")
    add("st_newline_after", "<|im_start|>\n\n<|im_end|>\n\n")
    # --- long words and repeats ---
    add("long_a", "a" * 1000)
    add("long_word_repeat", "supercalifragilisticexpialidocious" * 10)
    add("long_word_real", "Pneumonoultramicroscopicsilicovolcanoconiosis")
    add("long_camel", "ThisIsAVeryLongCamelCaseIdentifierThatKeepsGoingAndGoingForeverAndEver")
    add("long_mixed", "abc123" * 100)
    add("long_emoji", "\U0001F600" * 100)
    add("long_cjk", "\u6f22\u5b57" * 200)
    add("repeat_exclaim", "!!!!!!!!!!")
    add("repeat_mixed_punct", "??!!..,,;;::")
    add("repeat_dots", "......")
    add("repeat_dashes", "-------------------- ====== ***** ``` ~~~")
    add("unicode_punct", "\u2014\u2014 \u2026 \u00ab\u00bb \u300c\u300d \u3001\u3002")
    # --- URLs and paths ---
    add("url", "https://example.com/path/to/page?query=1&b=two#fragment")
    add("url_long", "https://www.example.org/" + "/".join(f"segment{i}" for i in range(30)) + "?x=" + "9" * 40)
    add("email", "Contact user.name+tag@example.co.uk or admin@localhost.")
    add("path", "/usr/local/lib/python3.11/site-packages/__init__.py C:\\Windows\\System32")
    # --- chat-formatted strings ---
    add("chat_single", chat(("user", "What is the capital of France?")))
    add("chat_system", chat(("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                            ("user", "Hi!")))
    add("chat_multi", chat(("user", "Write a haiku."), ("assistant", "Leaves fall quietly\nOn the old stone path"),
                           ("user", "Another, please \U0001F642")))
    add("chat_no_gen", chat(("user", "2+2=?"), ("assistant", "4"), generation_prompt=False))
    add("chat_code", chat(("user", "Fix:\n```py\nprint 'x'\n```")))
    # --- control characters and odd code points ---
    add("nul_byte", "a\x00b")
    add("control_chars", "\x01\x02\x1b[31mred\x1b[0m\x7f")
    add("bom_start", "\ufeffhello")
    add("private_use", "\ue000\uf8ff \U000F0000")
    add("unassigned", "\u0378 \U0001FFFE x")
    add("replacement_char", "\ufffd already")
    # --- invalid UTF-8 (stored hex-encoded) ---
    add("invalid_ff", b"abc\xff")
    add("invalid_lone_continuation", b"\x80 hello")
    add("invalid_truncated_2", b"caf\xc3")
    add("invalid_truncated_3", b"\xe2\x82 euro")
    add("invalid_truncated_emoji", b"smile \xf0\x9f\x98 now")
    add("invalid_overlong", b"\xc0\x80 \xc1\x81 \xe0\x80\xaf")
    add("invalid_surrogate", b"a\xed\xa0\x80b")
    add("invalid_mixed", b"valid \xff\xfe mixed \xc3\xa9 \x80\x80")
    add("invalid_in_special", b"<|im_start|>\xffuser<|im_end|>")
    # --- deterministic random strings over a mixed alphabet ---
    alphabet = (list("abcXYZ019 '\t\n\r.,!?<>|_-") + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] +
                ["\u00e9", "\u0301", "\u4e2d", "\U0001F600", "\u200d", "\u00a0", "\u3000", "\u0661", "\u00b2",
                 "\u05d0", "\u0928\u094d", "'s", "'LL", "  ", "\n\n", "123", "\ufe0f", "\U0001F1FA"])
    rng = random.Random(20240611)
    for i in range(30):
        add(f"random_{i:02d}", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    return cases


def text_fields(key, data):
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key + "_hex": data.hex()}


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


GPT2_BYTE_TO_CP = []
_extra = 256
for _b in range(256):
    if 0x21 <= _b <= 0x7E or 0xA1 <= _b <= 0xAC or _b >= 0xAE:
        GPT2_BYTE_TO_CP.append(_b)
    else:
        GPT2_BYTE_TO_CP.append(_extra)
        _extra += 1
GPT2_CP_TO_BYTE = {cp: b for b, cp in enumerate(GPT2_BYTE_TO_CP)}


def spm_vocab(tokens, types):
    """The "spm" variant's (tokens, scores, types), derived from SmolLM2's vocabulary."""
    out_tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    out_types = [2, 3, 3] + [6] * 256
    out_scores = [0.0] * len(out_tokens)
    seen = set(out_tokens)
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        if ttype in (3, 4):
            piece, score = text, 0.0
        elif ttype == 1:
            try:
                piece = bytes(GPT2_CP_TO_BYTE[ord(c)] for c in text).decode("utf-8").replace(" ", "\u2581")
            except (KeyError, UnicodeDecodeError):
                continue
            score = -float(i)
        else:
            continue
        if piece in seen:
            continue
        seen.add(piece)
        out_tokens.append(piece)
        out_types.append(ttype)
        out_scores.append(score)
    return out_tokens, out_scores, out_types


def write_variant(path, fields, variant):
    """Writes a vocab-only GGUF: the model's metadata with the variant's tokenizer changes."""
    import gguf

    T = gguf.GGUFValueType
    kv = dict(fields)
    if variant.startswith("bpe_"):
        pre = {"bpe_llama_bpe": "llama-bpe", "bpe_qwen2": "qwen2", "bpe_gpt2": "gpt-2",
               "bpe_default": "default"}[variant]
        kv["tokenizer.ggml.pre"] = ([T.STRING], pre)
        if variant == "bpe_llama_bpe":
            del kv["tokenizer.ggml.add_bos_token"]
    else:
        tokens, scores, types = spm_vocab(fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1])
        for key in list(kv):
            if key.startswith("tokenizer.ggml."):
                del kv[key]
        kv["tokenizer.ggml.model"] = ([T.STRING], "llama")
        kv["tokenizer.ggml.tokens"] = ([T.ARRAY, T.STRING], tokens)
        kv["tokenizer.ggml.scores"] = ([T.ARRAY, T.FLOAT32], scores)
        kv["tokenizer.ggml.token_type"] = ([T.ARRAY, T.INT32], types)
        kv["tokenizer.ggml.bos_token_id"] = ([T.UINT32], 1)
        kv["tokenizer.ggml.eos_token_id"] = ([T.UINT32], 2)
        kv["tokenizer.ggml.unknown_token_id"] = ([T.UINT32], 0)
    w = gguf.GGUFWriter(str(path), arch=kv["general.architecture"][1])
    for key, (types_, value) in kv.items():
        if key == "general.architecture":
            continue
        w.add_key_value(key, value, types_[0], sub_type=types_[-1] if types_[0] == T.ARRAY else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Order of the per-case hashes in tokenizer_variants.json.
RESULT_KEYS = ["ids_special", "ids_plain", "ids_add_special", "detok_special", "detok_plain"]

VARIANTS = ["bpe_llama_bpe", "bpe_qwen2", "bpe_gpt2", "bpe_default", "spm"]


class Reference:
    """One vocabulary loaded into llama.cpp (vocab only)."""

    def __init__(self, path):
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self):
        llama_cpp.llama_model_free(self.model)

    def tokenize(self, data, add_special, parse_special):
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        assert n >= 0
        return list(buf[:n])

    def detokenize(self, ids, remove_special, unparse_special):
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        cap = 64 + 16 * len(ids)
        out = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), out, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            out = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), out, cap, remove_special, unparse_special)
        assert n >= 0
        return out.raw[:n]

    def piece(self, token, special):
        out = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, out, 256, 0, special)
        if n < 0:
            out = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, out, -n, 0, special)
        return out.raw[:n]

    def vocab_facts(self):
        h_special, h_plain, h_attr = FNV_BASIS, FNV_BASIS, FNV_BASIS
        eog = []
        for t in range(self.n_vocab):
            ps, pp = self.piece(t, True), self.piece(t, False)
            h_special = fnv1a(fnv1a(h_special, f"{len(ps)}:".encode()), ps)
            h_plain = fnv1a(fnv1a(h_plain, f"{len(pp)}:".encode()), pp)
            h_attr = fnv1a(h_attr, f"{int(llama_cpp.llama_vocab_get_attr(self.vocab, t))},".encode())
            if llama_cpp.llama_vocab_is_eog(self.vocab, t):
                eog.append(t)
        return {
            "size": self.n_vocab,
            "bos": llama_cpp.llama_vocab_bos(self.vocab),
            "eos": llama_cpp.llama_vocab_eos(self.vocab),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(self.vocab)),
            "eog_ids": eog,
            "eog_texts": [self.piece(t, True).decode("utf-8", "replace") for t in eog],
            "pieces_special_fnv1a": str(h_special),
            "pieces_plain_fnv1a": str(h_plain),
            "attrs_fnv1a": str(h_attr),
        }

    def results(self, data):
        ids_special = self.tokenize(data, False, True)
        return {
            "ids_special": ids_special,
            "ids_plain": self.tokenize(data, False, False),
            "ids_add_special": self.tokenize(data, True, True),
            "detok_special": self.detokenize(ids_special, False, True),
            "detok_plain": self.detokenize(ids_special, True, False),
        }


def ids_bytes(ids):
    return ",".join(str(i) for i in ids).encode()


def write_json(path, head, cases):
    # One line per case keeps the file small and its diffs readable.
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(head, cases=[]), ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[: text.rindex("[]")] + "[\n" + body + "\n ]\n}\n")


def main():
    import gguf

    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run scripts/fetch_model.sh")
    global _quiet_log  # the callback must outlive every call into llama.cpp
    _quiet_log = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    about = ("Generated by tools/reference/gen_tokenizer_fixtures.py from llama.cpp "
             f"(llama-cpp-python {llama_cpp.__version__}); do not edit by hand.")
    texts = corpus()
    names = [n for n, _ in texts]
    assert len(names) == len(set(names))

    ref = Reference(MODEL)
    cases = []
    for name, data in texts:
        r = ref.results(data)
        case = {"name": name}
        case.update(text_fields("text", data))
        case.update({k: r[k] for k in ("ids_special", "ids_plain", "ids_add_special")})
        case.update(text_fields("detok_special", r["detok_special"]))
        case.update(text_fields("detok_plain", r["detok_plain"]))
        cases.append(case)
    facts = ref.vocab_facts()
    ref.close()
    write_json(OUT, {"about": about, "model": MODEL.name, "vocab": facts}, cases)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases, vocabulary of {facts['size']}, "
          f"EOG ids {facts['eog_ids']}", file=sys.stderr)

    reader = gguf.GGUFReader(str(MODEL))
    fields = {name: (list(f.types), f.contents()) for name, f in reader.fields.items()
              if not name.startswith("GGUF.")}
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            path = pathlib.Path(tmp) / f"{variant}.gguf"
            write_variant(path, fields, variant)
            vref = Reference(path)
            hashes = {}
            for name, data in texts:
                r = vref.results(data)
                hashes[name] = [f"{fnv1a(FNV_BASIS, ids_bytes(r[k]) if k.startswith('ids') else r[k]):016x}"
                                for k in RESULT_KEYS]
            variants[variant] = {"vocab": vref.vocab_facts(), "cases": hashes}
            print(f"variant {variant}: vocabulary of {vref.n_vocab}, EOG ids {variants[variant]['vocab']['eog_ids']}",
                  file=sys.stderr)
            vref.close()
    with open(OUT_VARIANTS, "w", encoding="utf-8") as f:
        f.write("{\n \"about\": " + json.dumps(about) + ",\n \"variants\": {\n")
        parts = []
        for variant, v in variants.items():
            lines = [f"  {json.dumps(variant)}: {{",
                     f"   \"vocab\": {json.dumps(v['vocab'], ensure_ascii=False)},",
                     "   \"cases\": {",
                     ",\n".join(f"    {json.dumps(n)}: {json.dumps(h)}" for n, h in v["cases"].items()),
                     "   }\n  }"]
            parts.append("\n".join(lines))
        f.write(",\n".join(parts) + "\n }\n}\n")
    print(f"wrote {OUT_VARIANTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
