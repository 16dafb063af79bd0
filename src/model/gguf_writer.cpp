#include "model/gguf_writer.h"

#include <cstring>

namespace pdserve {

namespace {
template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  size_t n = out.size();
  out.resize(n + sizeof(T));
  std::memcpy(out.data() + n, &v, sizeof(T));
}

void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  size_t n = out.size();
  out.resize(n + s.size());
  if (!s.empty()) std::memcpy(out.data() + n, s.data(), s.size());
}

void put_value(std::vector<uint8_t>& out, const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::kUint8: put<uint8_t>(out, static_cast<uint8_t>(std::get<uint64_t>(v.value))); break;
    case GgufValueType::kInt8: put<int8_t>(out, static_cast<int8_t>(std::get<int64_t>(v.value))); break;
    case GgufValueType::kUint16:
      put<uint16_t>(out, static_cast<uint16_t>(std::get<uint64_t>(v.value)));
      break;
    case GgufValueType::kInt16: put<int16_t>(out, static_cast<int16_t>(std::get<int64_t>(v.value))); break;
    case GgufValueType::kUint32:
      put<uint32_t>(out, static_cast<uint32_t>(std::get<uint64_t>(v.value)));
      break;
    case GgufValueType::kInt32: put<int32_t>(out, static_cast<int32_t>(std::get<int64_t>(v.value))); break;
    case GgufValueType::kUint64: put<uint64_t>(out, std::get<uint64_t>(v.value)); break;
    case GgufValueType::kInt64: put<int64_t>(out, std::get<int64_t>(v.value)); break;
    case GgufValueType::kFloat32: put<float>(out, static_cast<float>(std::get<double>(v.value))); break;
    case GgufValueType::kFloat64: put<double>(out, std::get<double>(v.value)); break;
    case GgufValueType::kBool: put<uint8_t>(out, std::get<bool>(v.value) ? 1 : 0); break;
    case GgufValueType::kString: put_string(out, std::get<std::string>(v.value)); break;
    case GgufValueType::kArray: {
      const auto& arr = std::get<GgufArray>(v.value);
      put<uint32_t>(out, static_cast<uint32_t>(arr.element_type));
      put<uint64_t>(out, arr.items.size());
      for (const auto& item : arr.items) put_value(out, item);
      break;
    }
  }
}
}  // namespace

void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  GgufArray arr{GgufValueType::kString, {}};
  for (const auto& s : v) arr.items.push_back({GgufValueType::kString, s});
  add(key, {GgufValueType::kArray, std::move(arr)});
}

void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  GgufArray arr{GgufValueType::kInt32, {}};
  for (int32_t x : v) arr.items.push_back({GgufValueType::kInt32, int64_t{x}});
  add(key, {GgufValueType::kArray, std::move(arr)});
}

void GgufWriter::add_f32_array(const std::string& key, const std::vector<float>& v) {
  GgufArray arr{GgufValueType::kFloat32, {}};
  for (float x : v) arr.items.push_back({GgufValueType::kFloat32, double{x}});
  add(key, {GgufValueType::kArray, std::move(arr)});
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                            std::vector<uint8_t> data) {
  tensors_.push_back({name, type, dims, std::move(data)});
}

std::vector<uint8_t> GgufWriter::finish() const {
  std::vector<uint8_t> out;
  put<uint32_t>(out, 0x46554747u);  // "GGUF" little-endian
  put<uint32_t>(out, version_);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kvs_.size());
  for (const auto& [key, value] : kvs_) {
    put_string(out, key);
    put<uint32_t>(out, static_cast<uint32_t>(value.type));
    put_value(out, value);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const auto& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) put<uint64_t>(out, static_cast<uint64_t>(d));
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offsets.push_back(offset);
    offset += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  size_t data_start = (out.size() + alignment_ - 1) / alignment_ * alignment_;
  out.resize(data_start, 0);
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& d = tensors_[i].data;
    out.resize(data_start + offsets[i] + d.size(), 0);
    if (!d.empty()) std::memcpy(out.data() + data_start + offsets[i], d.data(), d.size());
  }
  return out;
}

}  // namespace pdserve
