// Test helpers for src/transfer (tests only): paged KV memory owned by a vector, random
// contents and fragmented block tables, an independent, row-by-row oracle of the wire body, and
// a prefill in a process of its own (SpawnedPrefill).
// Not thread-safe; plain values.
#pragma once

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "transfer/kv_layout.h"

namespace pdserve::testing {

inline KvLayout test_layout(uint64_t fingerprint = 0xfeedf00d12345678ull, int32_t num_layers = 3,
                            int32_t kv_width = 8, KvDtype dtype = KvDtype::kF16) {
  return KvLayout{fingerprint, dtype, num_layers, kv_width};
}

// A paged KV region of num_blocks blocks (block_bytes = used + pad_bytes), filled with `fill`.
struct TestKv {
  std::vector<uint8_t> memory;
  PagedKvView view;

  TestKv(const KvLayout& layout, int32_t block_size, int32_t num_blocks, size_t pad_bytes = 0,
         uint8_t fill = 0) {
    view.layout = layout;
    view.block_size = block_size;
    view.num_blocks = num_blocks;
    view.block_bytes = view.used_block_bytes() + pad_bytes;
    memory.assign(view.block_bytes * static_cast<size_t>(num_blocks), fill);
    view.base = memory.data();
  }
  TestKv(const TestKv&) = delete;
  TestKv& operator=(const TestKv&) = delete;

  void fill_random(std::mt19937& rng) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : memory) b = static_cast<uint8_t>(byte(rng));
  }
  // Row `token` (a position of the sequence) of layer l, K (kv = 0) or V (kv = 1).
  const uint8_t* row(const std::vector<int32_t>& table, int32_t layer, int32_t kv, int32_t token) const {
    const size_t r = view.layout.row_bytes();
    const size_t bs = static_cast<size_t>(view.block_size);
    const size_t block = static_cast<size_t>(table[static_cast<size_t>(token) / bs]);
    return view.base + block * view.block_bytes +
           ((2 * static_cast<size_t>(layer) + kv) * bs + token % bs) * r;
  }
};

// `count` distinct blocks of [0, num_blocks) in random order (a fragmented block table).
inline std::vector<int32_t> random_table(std::mt19937& rng, int32_t num_blocks, int32_t count) {
  std::vector<int32_t> all(static_cast<size_t>(num_blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(count));
  return all;
}

inline int32_t blocks_for(int32_t num_tokens, int32_t block_size) {
  return (num_tokens + block_size - 1) / block_size;
}

// The wire body, row by row (independent of for_each_kv_run).
inline std::vector<uint8_t> reference_body(const TestKv& kv, const std::vector<int32_t>& table,
                                           int32_t num_tokens) {
  const size_t r = kv.view.layout.row_bytes();
  std::vector<uint8_t> body;
  body.reserve(kv.view.layout.body_bytes(num_tokens));
  for (int32_t l = 0; l < kv.view.layout.num_layers; ++l)
    for (int32_t part = 0; part < 2; ++part)
      for (int32_t t = 0; t < num_tokens; ++t) {
        const uint8_t* p = kv.row(table, l, part, t);
        body.insert(body.end(), p, p + r);
      }
  return body;
}

// A prefill in a process of its own: this test binary started again (posix_spawn, not fork) with
// an environment variable that makes `child_test` do the prefill's half. That test prints
// "HANDLE <handle>" on stdout, then waits for a line on stdin before it exits (its pool must
// outlive the pull); finish() sends the line and returns the child's exit status.
struct SpawnedPrefill {
  pid_t pid = -1;
  FILE* out = nullptr;
  int to_child = -1;
  std::string handle;

  // env_name=env_value is set for the child, which runs only the test `child_test`.
  SpawnedPrefill(const std::string& env_name, const std::string& env_value, const std::string& child_test) {
    ::signal(SIGPIPE, SIG_IGN);  // finish() writes to a child that may have been killed
    int to[2];
    int from[2];
    if (::pipe(to) != 0 || ::pipe(from) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to[0], 0);
    posix_spawn_file_actions_adddup2(&fa, from[1], 1);
    posix_spawn_file_actions_addclose(&fa, to[1]);
    posix_spawn_file_actions_addclose(&fa, from[0]);
    std::string env = env_name + "=" + env_value;
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e) envp.push_back(*e);
    envp.push_back(env.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe";
    std::string filter = "--gtest_filter=" + child_test;
    char* argv[] = {exe.data(), filter.data(), nullptr};
    const int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv, envp.data());
    posix_spawn_file_actions_destroy(&fa);
    ::close(to[0]);
    ::close(from[1]);
    to_child = to[1];
    out = ::fdopen(from[0], "r");
    if (rc != 0) {
      pid = -1;
      return;
    }
    char line[1024];
    while (std::fgets(line, sizeof line, out)) {
      const std::string l(line);
      if (l.starts_with("HANDLE ")) {
        handle = l.substr(7, l.size() - 8);
        break;
      }
    }
  }
  SpawnedPrefill(const SpawnedPrefill&) = delete;
  SpawnedPrefill& operator=(const SpawnedPrefill&) = delete;
  // Lets the child exit; its exit status (0 when all went well), or -1.
  int finish() {
    if (to_child >= 0) {
      [[maybe_unused]] ssize_t n = ::write(to_child, "done\n", 5);
      ::close(to_child);
      to_child = -1;
    }
    char line[1024];
    while (out != nullptr && std::fgets(line, sizeof line, out)) {  // the child's test output, to its end
    }
    if (out != nullptr) std::fclose(out);
    out = nullptr;
    int status = 0;
    if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return -1;
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  ~SpawnedPrefill() {
    if (pid > 0) ::kill(pid, SIGKILL);
    finish();
  }
};

}  // namespace pdserve::testing
