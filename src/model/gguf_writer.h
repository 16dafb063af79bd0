// GgufWriter: builds GGUF v3 files in memory. Used by tests (well-formed and deliberately
// malformed files), fuzz seeds, and tools that emit small models. Not thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/gguf.h"

namespace pdserve {

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t version = 3, uint64_t alignment = 32)
      : version_(version), alignment_(alignment) {}

  void add(const std::string& key, const GgufValue& value) { kvs_.emplace_back(key, value); }
  void add_u32(const std::string& key, uint32_t v) { add(key, {GgufValueType::kUint32, uint64_t{v}}); }
  void add_f32(const std::string& key, float v) { add(key, {GgufValueType::kFloat32, double{v}}); }
  void add_bool(const std::string& key, bool v) { add(key, {GgufValueType::kBool, v}); }
  void add_string(const std::string& key, const std::string& v) { add(key, {GgufValueType::kString, v}); }
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);

  // `data` must hold exactly the tensor's byte size for its type and dims.
  void add_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                  std::vector<uint8_t> data);

  std::vector<uint8_t> finish() const;

 private:
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> dims;
    std::vector<uint8_t> data;
  };
  uint32_t version_;
  uint64_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::vector<Tensor> tensors_;
};

}  // namespace pdserve
