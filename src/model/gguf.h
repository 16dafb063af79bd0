// GGUF reader: parses the header, metadata and tensor directory of a GGUF v2/v3 file and gives
// zero-copy views of tensor data in a read-only memory map (weights stay quantized in memory).
//
// Every byte of the file is untrusted: a malformed file yields a Status naming the problem and
// the byte offset, never a crash, an over-read or an allocation larger than the file justifies.
// A GgufFile is immutable after open(); share it freely across threads. Tensor views point into
// the mapping, which lives as long as the GgufFile.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "common/status.h"
#include "kernels/ggml_types.h"

namespace pdserve {

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

struct GgufValue;
struct GgufArray {
  GgufValueType element_type = GgufValueType::kUint8;
  std::vector<GgufValue> items;
};

struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  std::variant<uint64_t, int64_t, double, bool, std::string, GgufArray> value;

  // Typed accessors; a value of another type (or a negative/oversized integer) is an error
  // whose message names `key`.
  StatusOr<int64_t> as_int(const std::string& key) const;
  StatusOr<double> as_float(const std::string& key) const;  // also accepts integers
  StatusOr<bool> as_bool(const std::string& key) const;
  StatusOr<std::string> as_string(const std::string& key) const;
  const GgufArray* as_array() const { return std::get_if<GgufArray>(&value); }
  // Human-readable rendering; arrays are abbreviated after `max_items`.
  std::string to_display(size_t max_items = 8) const;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne[0] is the innermost (contiguous) dimension, as in GGML
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;  // relative to the start of the data section
  uint64_t size_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping

  int64_t num_elements() const;
};

struct GgufLimits {
  uint64_t max_string_bytes = 64ull << 20;
  int max_array_depth = 4;
  uint64_t max_tensor_count = 1u << 20;
  uint64_t max_kv_count = 1u << 20;
};

class GgufFile {
 public:
  // Maps and parses a file. The error names the path.
  static StatusOr<std::unique_ptr<GgufFile>> open(const std::string& path);
  // Parses bytes the caller keeps alive for the GgufFile's lifetime (tests, fuzzing).
  static StatusOr<std::unique_ptr<GgufFile>> parse(std::span<const uint8_t> bytes,
                                                   const GgufLimits& limits = {});
  // Parses bytes it keeps (a file made in memory, e.g. a tokenizer converted from another format).
  static StatusOr<std::unique_ptr<GgufFile>> parse_owned(std::vector<uint8_t> bytes,
                                                         const GgufLimits& limits = {});
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  uint64_t file_size() const { return bytes_.size(); }
  // Identifies the model: a 64-bit hash of the header (metadata and tensor table) and of the
  // first and last 64 KiB of tensor data. Two instances exchange KV only when theirs agree.
  uint64_t fingerprint() const;

  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const GgufValue* find(const std::string& key) const;
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;

  // Typed metadata lookups: a missing key is NOT_FOUND, a wrong type INVALID_ARGUMENT.
  StatusOr<int64_t> get_int(const std::string& key) const;
  StatusOr<double> get_float(const std::string& key) const;
  StatusOr<std::string> get_string(const std::string& key) const;
  // With a default for a missing key (a present key of the wrong type is still an error).
  StatusOr<int64_t> get_int_or(const std::string& key, int64_t fallback) const;
  StatusOr<double> get_float_or(const std::string& key, double fallback) const;
  StatusOr<bool> get_bool_or(const std::string& key, bool fallback) const;

  // Tells the kernel that the whole pages inside [p, p + n) of the mapping will not be read
  // soon, so they stop counting as resident; reading them again faults them back in from the
  // file. A no-op for parsed (unmapped) bytes.
  void release_pages(const uint8_t* p, size_t n) const;

 private:
  GgufFile() = default;
  friend class GgufParser;

  std::span<const uint8_t> bytes_;
  std::vector<uint8_t> owned_;  // parse_owned's bytes (bytes_ views them)
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace pdserve
