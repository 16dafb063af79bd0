#!/usr/bin/env bash
# Builds the fuzz targets with clang + libFuzzer (preset `fuzz`) and runs each for a bounded
# time on a seed corpus. Exit status: 0 if no crash.
#   tests/fuzz/run_fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (targets: gguf_fuzz api_request_fuzz internal_api_fuzz sse_fuzz trace_fuzz kv_wire_fuzz ucx_protocol_fuzz cluster_config_fuzz json_fuzz safetensors_fuzz hf_tokenizer_fuzz json_constraint_fuzz)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_fuzz api_request_fuzz internal_api_fuzz sse_fuzz trace_fuzz kv_wire_fuzz ucx_protocol_fuzz cluster_config_fuzz json_fuzz safetensors_fuzz hf_tokenizer_fuzz json_constraint_fuzz)
cd "$root"
if ! command -v clang++ >/dev/null; then
  echo "run_fuzz: clang++ is not installed (apt-get install clang); cannot build fuzz targets" >&2
  exit 1
fi
cmake --preset fuzz >/dev/null
cmake --build build/fuzz --target "${targets[@]}" >/dev/null
for target in "${targets[@]}"; do
  case "$target" in
    gguf_fuzz)
      # Seeds: the GGUF files at hand; the default model is large, so a truncated copy of its header.
      corpus="build/fuzz/corpus/gguf"
      mkdir -p "$corpus"
      cp -n models/*.gguf "$corpus/" 2>/dev/null || true
      if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
        head -c 65536 models/SmolLM2-135M-Instruct.Q4_1.gguf > "$corpus/smollm2-head.gguf"
        rm -f "$corpus/SmolLM2-135M-Instruct.Q4_1.gguf"
      fi
      build/fuzz/tests/fuzz/gguf_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=70000 "$corpus" 2>&1 | tail -n 5
      ;;
    api_request_fuzz)
      # Seeds: tests/fuzz/corpus/api_request (checked in); what the fuzzer finds goes to build/.
      corpus="build/fuzz/corpus/api_request"
      mkdir -p "$corpus"
      build/fuzz/tests/fuzz/api_request_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 \
        -dict=tests/fuzz/api_request.dict "$corpus" tests/fuzz/corpus/api_request 2>&1 | tail -n 5
      ;;
    internal_api_fuzz)
      # Seeds: a request, a handoff, a release, an output event, a pulled event, stats.
      corpus="build/fuzz/corpus/internal_api"
      mkdir -p "$corpus"
      printf '{"prompt":[1,2,3],"max_tokens":8,"stop":["x"],"ignore_eos":false,"logprobs":true,"sampling":{"temperature":0.5,"top_k":4,"seed":7,"top_logprobs":2,"logit_bias":[[2,-100],[9,1.5]]}}' > "$corpus/request"
      printf '{"request":{"prompt":[5],"max_tokens":2},"handoff":{"kv":"kv1;shm;contiguous;3;9;4160;/proc/1/fd/5","first_token":11,"num_prompt_tokens":1}}' > "$corpus/handoff"
      printf '{"buffer_id":3,"generation":9}' > "$corpus/release"
      printf '{"text":"hi","tokens":[{"id":3,"logprob":-0.5,"top":[[3,-0.5],[4,-1.0]]}],"finished":true,"finish_reason":"error","prompt_tokens":4,"completion_tokens":1,"cached_prompt_tokens":0,"error":{"code":"UNAVAILABLE","message":"x"}}' > "$corpus/output"
      printf '{"pulled":{"ok":false,"error":{"code":"DATA_LOSS","message":"short"}}}' > "$corpus/pulled"
      printf '{"role":"decode","max_context":8192,"max_sequence_tokens":4096,"model_fingerprint":1,"transport":"tcp","metrics":{"running":1,"kv":{"num_blocks_total":4},"finished_by_reason":{"stop":2}}}' > "$corpus/stats"
      build/fuzz/tests/fuzz/internal_api_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    sse_fuzz)
      # Seeds: a streamed chat completion, an error event, a /metrics text (first byte: split pattern).
      corpus="build/fuzz/corpus/sse"
      mkdir -p "$corpus"
      printf '\x05data: {"choices":[{"delta":{"content":"Hi"}}]}\r\n\r\ndata: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n' > "$corpus/stream"
      printf '\x02: keep-alive\rdata: {"error":{"message":"boom"}}\r\rid: 7\ndata: x\ndata: y\n' > "$corpus/error"
      printf '\x00# TYPE pdserve_x counter\npdserve_x{a="b"} 3\n{"data":[{"id":"m"}],"count":4}' > "$corpus/metrics"
      build/fuzz/tests/fuzz/sse_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 "$corpus" 2>&1 | tail -n 5
      ;;
    trace_fuzz)
      # Seeds, one per parser (the first byte picks it): Mooncake JSONL, Azure CSV, scenarios, a length spec.
      corpus="build/fuzz/corpus/trace"
      mkdir -p "$corpus"
      printf '\x00{"timestamp": 0, "input_length": 700, "output_length": 20, "hash_ids": [0, 1]}\n{"timestamp": 50, "input_length": 30, "output_length": 9}\n' > "$corpus/mooncake"
      printf '\x01TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n' > "$corpus/azure"
      printf '\x02[{"name":"chat","rate":2,"arrival":"gamma","cv":2,"input":"normal:256:32","output":"uniform:10:50"},{"name":"code","rate":0.5,"arrival":"tidal","period_s":60,"system_tokens":100}]' > "$corpus/scenarios"
      printf '\x03normal:256:32' > "$corpus/length"
      build/fuzz/tests/fuzz/trace_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 "$corpus" 2>&1 | tail -n 5
      ;;
    kv_wire_fuzz)
      # Seeds: valid KV wire headers (+ block-size byte + body) and handles, written by kv_wire_seeds.
      corpus="build/fuzz/corpus/kv_wire"
      mkdir -p "$corpus"
      cmake --build build/fuzz --target kv_wire_seeds >/dev/null
      build/fuzz/tests/fuzz/kv_wire_seeds "$corpus"
      build/fuzz/tests/fuzz/kv_wire_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    ucx_protocol_fuzz)
      # Seeds: a request, an OK response (with a 64-byte wire header after it) and an error one.
      corpus="build/fuzz/corpus/ucx_protocol"
      mkdir -p "$corpus"
      printf 'PDUQ\x01\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00' > "$corpus/request"
      { printf 'PDUR\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x10\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00'
        head -c 64 /dev/zero; } > "$corpus/ok"
      printf 'PDUR\x01\x00\x00\x00\x05\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00gone' > "$corpus/error"
      build/fuzz/tests/fuzz/ucx_protocol_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=2048 "$corpus" 2>&1 | tail -n 5
      ;;
    cluster_config_fuzz)
      # Seeds: the example cluster and a small one with defaults; the dictionary holds the keys.
      corpus="build/fuzz/corpus/cluster_config"
      mkdir -p "$corpus"
      cp deploy/cluster.example.toml "$corpus/example.toml"
      printf '[instance_defaults]\nthreads = 1\n[[instance]]\nrole = "prefill"\nport = 1\n[[instance]]\nrole = "decode"\nport = 2\nno_prefix_caching = true\n' > "$corpus/small.toml"
      build/fuzz/tests/fuzz/cluster_config_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 \
        -dict=tests/fuzz/cluster_config.dict "$corpus" 2>&1 | tail -n 5
      ;;
    json_fuzz)
      # Seeds: a Hugging Face config.json, a shard index, escapes and numbers.
      corpus="build/fuzz/corpus/json"
      mkdir -p "$corpus"
      printf '{"model_type": "llama", "hidden_size": 4096, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}, "tie_word_embeddings": false, "x": null}' > "$corpus/config"
      printf '{"metadata": {"total_size": 16}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}' > "$corpus/index"
      printf '["\\u00e9\\ud83d\\ude00\\n", -0.5e-3, 1e308, 9223372036854775807, [[[]]], {}]' > "$corpus/values"
      build/fuzz/tests/fuzz/json_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    json_constraint_fuzz)
      # Seeds: an object of every kind of value, escapes and surrogate pairs, multi-byte UTF-8.
      corpus="build/fuzz/corpus/json_constraint"
      mkdir -p "$corpus"
      printf '{"a": [1, -0.5e+10, 0, true, false, null, {}, [[]]], "b": {"c": "d"}}' > "$corpus/values"
      printf '{"s": "\\" \\\\ \\/ \\n \\u00e9 \\ud83d\\ude00", "t": "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}' > "$corpus/strings"
      build/fuzz/tests/fuzz/json_constraint_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    safetensors_fuzz)
      # Seeds: a file of two tensors (8-byte header length, JSON header, data).
      corpus="build/fuzz/corpus/safetensors"
      mkdir -p "$corpus"
      header='{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}'
      {
        printf "$(printf '\\x%02x' $(( ${#header} & 255 )) $(( ${#header} >> 8 )))\x00\x00\x00\x00\x00\x00"
        printf '%s' "$header"
        printf '\x80\x3f\x00\x40\x40\x40\x80\x40\x00\x00\x80\x3f'
      } > "$corpus/two"
      build/fuzz/tests/fuzz/safetensors_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    hf_tokenizer_fuzz)
      # Seeds: a byte-level BPE tokenizer.json of each pre-tokenizer pdserve reads, a NUL, then a
      # tokenizer_config.json.
      corpus="build/fuzz/corpus/hf_tokenizer"
      mkdir -p "$corpus"
      vocab='"vocab":{"<s>":0,"H":1,"e":2,"l":3,"o":4,"He":5,"ll":6,"Ġ":7,"1":8,"2":9,"3":10},"merges":["H e",["l","l"]]'
      added='"added_tokens":[{"id":0,"content":"<s>","special":true,"normalized":false}]'
      byte_level='{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}'
      split='{"type":"Split","pattern":{"Regex":"(?i:'"'"'s|'"'"'t|'"'"'re|'"'"'ve|'"'"'m|'"'"'ll|'"'"'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false}'
      printf '%s' "{$added,\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[$split,$byte_level]},\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}]},\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\",$vocab}}" > "$corpus/llama3"
      { printf '%s' "{$added,\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Digits\",\"individual_digits\":true},{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}]},\"model\":{\"type\":\"BPE\",$vocab}}"
        printf '\x00{"bos_token":{"content":"<s>"},"eos_token":"<s>","add_bos_token":true,"chat_template":"{{ messages }}"}'; } > "$corpus/smollm"
      build/fuzz/tests/fuzz/hf_tokenizer_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 "$corpus" 2>&1 | tail -n 5
      ;;
    *) echo "run_fuzz: unknown target $target" >&2; exit 2 ;;
  esac
done
