#!/usr/bin/env bash
# Source this file to get the reference Python environment:
#   source tools/reference/env.sh && python tools/reference/gen_....py
# It builds llama.cpp from the llama-cpp-python source package (build_llama_cpp.sh), makes a venv
# in build/reference/venv with the binding's pure-Python dependencies, and points the binding
# (loaded from the unpacked source package, not pip-built) at the shared library just built.
_pd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_pd_ref="$("$_pd_root/tools/reference/build_llama_cpp.sh")" || return 1
if [ ! -x "$_pd_ref/venv/bin/python" ]; then
  python3 -m venv "$_pd_ref/venv"
  "$_pd_ref/venv/bin/pip" install --quiet numpy typing_extensions diskcache jinja2 pyyaml sentencepiece || return 1
fi
_pd_src="$(ls -d "$_pd_ref"/llama_cpp_python-*/ | head -n 1)"
export PATH="$_pd_ref/venv/bin:$_pd_ref/llama.cpp-build/bin:$PATH"
export PYTHONPATH="${_pd_src%/}:${_pd_src%/}/vendor/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
export LLAMA_CPP_LIB_PATH="$_pd_ref/llama.cpp-build/bin"
export PDSERVE_REFERENCE_DIR="$_pd_ref"
unset _pd_root _pd_ref _pd_src
