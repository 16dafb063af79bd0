# pdserve front door. `make serve` and `make test` do all the set-up on a fresh Debian 12 machine.
PRESET ?= release
BUILD_DIR := build/$(PRESET)
JOBS ?= $(shell nproc)
ARGS ?=

.PHONY: all setup configure build test test-fast test-slow serve chat format clean asan tsan fuzz

all: build

setup:
	@scripts/setup.sh

$(BUILD_DIR)/build.ninja: CMakeLists.txt CMakePresets.json
	@cmake --preset $(PRESET) >/dev/null

configure: setup $(BUILD_DIR)/build.ninja

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

# Every test: the fast tier and the slow tier.
test: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

test-fast: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS) -L fast

test-slow: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS) -L slow

# The OpenAI-compatible server on 127.0.0.1:8000 with the default model, prefill and decode
# disaggregated in one process (ARGS="--mode aggregated --port 9000 ..." adds flags).
serve: build
	@$(BUILD_DIR)/src/bin/pdserve serve $(ARGS)

# An interactive chat in the terminal, without the server.
chat: build
	@$(BUILD_DIR)/src/bin/pdserve generate --chat $(ARGS)

# Sanitizer builds of everything, with their tests.
asan tsan:
	@scripts/setup.sh
	@cmake --preset $@ >/dev/null
	@cmake --build build/$@ -j $(JOBS)
	@ctest --test-dir build/$@ --output-on-failure -j $(JOBS) -L fast

format:
	@find src tests bench -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf build/release build/debug build/asan build/tsan build/fuzz
