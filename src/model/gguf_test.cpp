#include "model/gguf.h"

#include <gtest/gtest.h>

#include <cstring>

#include "model/gguf_writer.h"

namespace pdserve {
namespace {

std::vector<uint8_t> f32_bytes(size_t n) {
  std::vector<uint8_t> b(n * 4);
  for (size_t i = 0; i < n; ++i) {
    float v = static_cast<float>(i) * 0.5f;
    std::memcpy(b.data() + i * 4, &v, 4);
  }
  return b;
}

std::vector<uint8_t> valid_file() {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 2);
  w.add_f32("llama.rope.freq_base", 10000.0f);
  w.add_bool("tokenizer.ggml.add_bos_token", true);
  w.add_string_array("tokenizer.ggml.tokens", {"a", "b", "ü"});
  w.add("test.i64", {GgufValueType::kInt64, int64_t{-5}});
  w.add("test.f64", {GgufValueType::kFloat64, 2.5});
  w.add("test.u8", {GgufValueType::kUint8, uint64_t{7}});
  w.add("test.i16", {GgufValueType::kInt16, int64_t{-300}});
  GgufArray inner{GgufValueType::kInt32,
                  {{GgufValueType::kInt32, int64_t{1}}, {GgufValueType::kInt32, int64_t{2}}}};
  GgufArray outer{GgufValueType::kArray, {{GgufValueType::kArray, inner}, {GgufValueType::kArray, inner}}};
  w.add("test.nested", {GgufValueType::kArray, outer});
  w.add_tensor("a", GgmlType::kF32, {4, 2}, f32_bytes(8));
  w.add_tensor("b", GgmlType::kF32, {3}, f32_bytes(3));
  return w.finish();
}

TEST(Gguf, ParsesEveryValueTypeAndTensors) {
  auto bytes = valid_file();
  auto f = GgufFile::parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ(*(*f)->get_string("general.architecture"), "llama");
  EXPECT_EQ(*(*f)->get_int("llama.block_count"), 2);
  EXPECT_EQ(*(*f)->get_float("llama.rope.freq_base"), 10000.0);
  EXPECT_EQ(*(*f)->get_bool_or("tokenizer.ggml.add_bos_token", false), true);
  EXPECT_EQ(*(*f)->get_int("test.i64"), -5);
  EXPECT_EQ(*(*f)->get_float("test.f64"), 2.5);
  EXPECT_EQ(*(*f)->get_int("test.u8"), 7);
  EXPECT_EQ(*(*f)->get_int("test.i16"), -300);
  const GgufArray* tokens = (*f)->find("tokenizer.ggml.tokens")->as_array();
  ASSERT_NE(tokens, nullptr);
  ASSERT_EQ(tokens->items.size(), 3u);
  EXPECT_EQ(*tokens->items[2].as_string("t"), "ü");
  const GgufArray* nested = (*f)->find("test.nested")->as_array();
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->items[1].as_array()->items[1].as_int("x").value(), 2);

  const GgufTensorInfo* a = (*f)->find_tensor("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dims, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(a->size_bytes, 32u);
  float v5;
  std::memcpy(&v5, a->data + 20, 4);
  EXPECT_EQ(v5, 2.5f);
  const GgufTensorInfo* b = (*f)->find_tensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ((b->data - bytes.data()) % 32, 0);
  EXPECT_EQ((*f)->get_int("missing").status().code(), StatusCode::kNotFound);
  EXPECT_EQ((*f)->get_int("general.architecture").status().code(), StatusCode::kInvalidArgument);
}

TEST(Gguf, ParsesVersion2AndCustomAlignment) {
  GgufWriter w(2, 64);
  w.add_u32("general.alignment", 64);
  w.add_tensor("t", GgmlType::kF32, {5}, f32_bytes(5));
  w.add_tensor("u", GgmlType::kF32, {5}, f32_bytes(5));
  auto bytes = w.finish();
  auto f = GgufFile::parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->data_offset() % 64, 0u);
  EXPECT_EQ((*f)->find_tensor("u")->offset, 64u);
}

TEST(Gguf, EveryTruncationIsACleanError) {
  auto bytes = valid_file();
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<long>(n));
    auto f = GgufFile::parse(cut);
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_NE(f.status().message().find("gguf"), std::string::npos) << f.status().message();
  }
}

// Patches bytes of a valid file at the position of a marker string.
struct Case {
  const char* name;
  std::function<std::vector<uint8_t>()> make;
  const char* expected;  // substring of the error message
};

std::vector<uint8_t> header(uint32_t version, uint64_t tensors, uint64_t kvs) {
  std::vector<uint8_t> b = {'G', 'G', 'U', 'F'};
  auto put = [&b](auto v) {
    size_t n = b.size();
    b.resize(n + sizeof(v));
    std::memcpy(b.data() + n, &v, sizeof(v));
  };
  put(version);
  put(tensors);
  put(kvs);
  return b;
}

template <typename T>
void append(std::vector<uint8_t>& b, T v) {
  size_t n = b.size();
  b.resize(n + sizeof(T));
  std::memcpy(b.data() + n, &v, sizeof(T));
}
void append_str(std::vector<uint8_t>& b, const std::string& s) {
  append<uint64_t>(b, s.size());
  b.insert(b.end(), s.begin(), s.end());
}

std::vector<uint8_t> one_tensor(uint32_t n_dims, std::vector<uint64_t> dims, uint32_t type, uint64_t offset,
                                size_t data_bytes) {
  auto b = header(3, 1, 0);
  append_str(b, "w");
  append<uint32_t>(b, n_dims);
  for (uint64_t d : dims) append<uint64_t>(b, d);
  append<uint32_t>(b, type);
  append<uint64_t>(b, offset);
  b.resize((b.size() + 31) / 32 * 32 + data_bytes, 0);
  return b;
}

std::vector<uint8_t> one_kv(const std::string& key, uint32_t type, const std::vector<uint8_t>& payload) {
  auto b = header(3, 0, 1);
  append_str(b, key);
  append<uint32_t>(b, type);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

TEST(Gguf, MalformedFilesGiveClearErrors) {
  const std::vector<Case> cases = {
      {"empty", [] { return std::vector<uint8_t>{}; }, "not a GGUF file"},
      {"bad magic",
       [] {
         auto b = valid_file();
         b[0] = 'X';
         return b;
       },
       "not a GGUF file"},
      {"version 1", [] { return header(1, 0, 0); }, "GGUF version 1 is not supported"},
      {"version 99", [] { return header(99, 0, 0); }, "GGUF version 99"},
      {"absurd tensor count", [] { return header(3, 1ull << 60, 0); }, "tensor count"},
      {"absurd kv count", [] { return header(3, 0, 1ull << 40); }, "metadata count"},
      {"string longer than file",
       [] {
         auto b = header(3, 0, 1);
         append<uint64_t>(b, 1ull << 62);
         b.resize(b.size() + 16);
         return b;
       },
       "only"},
      {"unknown value type",
       [] {
         return one_kv("k", 77, {0, 0, 0, 0});
       },
       "unknown value type 77"},
      {"bool not 0/1", [] { return one_kv("k", 7, {2}); }, "bool value is 2"},
      {"array count absurd",
       [] {
         std::vector<uint8_t> p;
         append<uint32_t>(p, 4);
         append<uint64_t>(p, 1ull << 61);
         return one_kv("k", 9, p);
       },
       "cannot fit"},
      {"array of unknown type",
       [] {
         std::vector<uint8_t> p;
         append<uint32_t>(p, 13);
         append<uint64_t>(p, 1);
         return one_kv("k", 9, p);
       },
       "unknown array element type 13"},
      {"arrays nested too deep",
       [] {
         std::vector<uint8_t> p;
         for (int i = 0; i < 6; ++i) {
           append<uint32_t>(p, 9);
           append<uint64_t>(p, 1);
         }
         append<uint32_t>(p, 0);
         append<uint64_t>(p, 0);
         return one_kv("k", 9, p);
       },
       "nested deeper"},
      {"duplicate key",
       [] {
         auto b = header(3, 0, 2);
         for (int i = 0; i < 2; ++i) {
           append_str(b, "dup");
           append<uint32_t>(b, 4);
           append<uint32_t>(b, 1);
         }
         return b;
       },
       "appears twice"},
      {"bad alignment",
       [] {
         std::vector<uint8_t> p;
         append<uint32_t>(p, 48);
         return one_kv("general.alignment", 4, p);
       },
       "power of two"},
      {"zero dims", [] { return one_tensor(0, {}, 0, 0, 0); }, "has 0 dimensions"},
      {"five dims",
       [] {
         return one_tensor(5, {1, 1, 1, 1, 1}, 0, 0, 4);
       },
       "has 5 dimensions"},
      {"zero-size dim",
       [] {
         return one_tensor(2, {4, 0}, 0, 0, 0);
       },
       "dimension 1 is 0"},
      {"overflowing product",
       [] {
         return one_tensor(3, {1ull << 30, 1ull << 30, 1ull << 30}, 0, 0, 0);
       },
       "overflows"},
      {"unknown tensor type", [] { return one_tensor(1, {4}, 99, 0, 16); }, "unknown type id 99"},
      {"row not a block multiple", [] { return one_tensor(1, {33}, 2, 0, 64); },
       "not a multiple of the block"},
      {"misaligned offset", [] { return one_tensor(1, {4}, 0, 3, 64); }, "not a multiple of the alignment"},
      {"offset past end", [] { return one_tensor(1, {4}, 0, 1ull << 40, 16); }, "extends past the end"},
      {"data truncated", [] { return one_tensor(1, {64}, 0, 0, 100); }, "truncated"},
      {"duplicate tensor",
       [] {
         auto b = header(3, 2, 0);
         for (int i = 0; i < 2; ++i) {
           append_str(b, "t");
           append<uint32_t>(b, 1);
           append<uint64_t>(b, 4);
           append<uint32_t>(b, 0);
           append<uint64_t>(b, 0);
         }
         b.resize(256, 0);
         return b;
       },
       "appears twice"},
  };
  for (const Case& c : cases) {
    auto bytes = c.make();
    auto f = GgufFile::parse(bytes);
    ASSERT_FALSE(f.ok()) << c.name;
    EXPECT_NE(f.status().message().find(c.expected), std::string::npos)
        << c.name << ": got '" << f.status().message() << "'";
    if (bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0 &&
        std::string(c.name) != "bad alignment") {
      EXPECT_NE(f.status().message().find("byte"), std::string::npos)
          << c.name << ": no byte offset in '" << f.status().message() << "'";
    }
  }
}

TEST(Gguf, OpenReportsMissingFile) {
  auto f = GgufFile::open("/nonexistent/model.gguf");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  EXPECT_NE(f.status().message().find("--model"), std::string::npos);
}

}  // namespace
}  // namespace pdserve
