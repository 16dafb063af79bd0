#include "model/gguf.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

namespace pdserve {

namespace {
constexpr uint32_t kMaxDims = 4;

std::string_view value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8: return "uint8";
    case GgufValueType::kInt8: return "int8";
    case GgufValueType::kUint16: return "uint16";
    case GgufValueType::kInt16: return "int16";
    case GgufValueType::kUint32: return "uint32";
    case GgufValueType::kInt32: return "int32";
    case GgufValueType::kFloat32: return "float32";
    case GgufValueType::kBool: return "bool";
    case GgufValueType::kString: return "string";
    case GgufValueType::kArray: return "array";
    case GgufValueType::kUint64: return "uint64";
    case GgufValueType::kInt64: return "int64";
    case GgufValueType::kFloat64: return "float64";
  }
  return "unknown";
}

// Smallest encoded size of one value of a type: bounds counts before anything is allocated.
uint64_t min_encoded_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool: return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16: return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32: return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
    case GgufValueType::kString: return 8;
    case GgufValueType::kArray: return 12;
  }
  return 1;
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }
}  // namespace

// The parser: a cursor over untrusted bytes. Every read is bounds-checked.
class GgufParser {
 public:
  GgufParser(std::span<const uint8_t> bytes, const GgufLimits& limits) : b_(bytes), limits_(limits) {}

  Status parse(GgufFile& f);

 private:
  Status error(uint64_t at, const std::string& what) const {
    return data_loss(fmt::format("gguf: at byte {}: {}", at, what));
  }
  uint64_t remaining() const { return b_.size() - pos_; }

  template <typename T>
  Status read(T& out, const char* what) {
    if (remaining() < sizeof(T)) {
      return error(pos_, fmt::format("file ends while reading {} ({} bytes needed, {} left)", what, sizeof(T),
                                     remaining()));
    }
    std::memcpy(&out, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return ok_status();
  }

  Status read_string(std::string& out, const char* what) {
    uint64_t at = pos_;
    uint64_t len = 0;
    PD_RETURN_IF_ERROR(read(len, what));
    if (len > remaining()) {
      return error(
          at, fmt::format("{} has length {} but only {} bytes remain in the file", what, len, remaining()));
    }
    if (len > limits_.max_string_bytes) {
      return error(at, fmt::format("{} has length {}, above the limit of {} bytes", what, len,
                                   limits_.max_string_bytes));
    }
    out.assign(reinterpret_cast<const char*>(b_.data() + pos_), len);
    pos_ += len;
    return ok_status();
  }

  Status read_value(GgufValueType type, GgufValue& out, int depth, const std::string& key);

  std::span<const uint8_t> b_;
  GgufLimits limits_;
  uint64_t pos_ = 0;
};

Status GgufParser::read_value(GgufValueType type, GgufValue& out, int depth, const std::string& key) {
  out.type = type;
  switch (type) {
    case GgufValueType::kUint8: {
      uint8_t v{};
      PD_RETURN_IF_ERROR(read(v, "a uint8 value"));
      out.value = uint64_t{v};
      break;
    }
    case GgufValueType::kInt8: {
      int8_t v{};
      PD_RETURN_IF_ERROR(read(v, "an int8 value"));
      out.value = int64_t{v};
      break;
    }
    case GgufValueType::kUint16: {
      uint16_t v{};
      PD_RETURN_IF_ERROR(read(v, "a uint16 value"));
      out.value = uint64_t{v};
      break;
    }
    case GgufValueType::kInt16: {
      int16_t v{};
      PD_RETURN_IF_ERROR(read(v, "an int16 value"));
      out.value = int64_t{v};
      break;
    }
    case GgufValueType::kUint32: {
      uint32_t v{};
      PD_RETURN_IF_ERROR(read(v, "a uint32 value"));
      out.value = uint64_t{v};
      break;
    }
    case GgufValueType::kInt32: {
      int32_t v{};
      PD_RETURN_IF_ERROR(read(v, "an int32 value"));
      out.value = int64_t{v};
      break;
    }
    case GgufValueType::kUint64: {
      uint64_t v{};
      PD_RETURN_IF_ERROR(read(v, "a uint64 value"));
      out.value = v;
      break;
    }
    case GgufValueType::kInt64: {
      int64_t v{};
      PD_RETURN_IF_ERROR(read(v, "an int64 value"));
      out.value = v;
      break;
    }
    case GgufValueType::kFloat32: {
      float v{};
      PD_RETURN_IF_ERROR(read(v, "a float32 value"));
      out.value = double{v};
      break;
    }
    case GgufValueType::kFloat64: {
      double v{};
      PD_RETURN_IF_ERROR(read(v, "a float64 value"));
      out.value = v;
      break;
    }
    case GgufValueType::kBool: {
      uint64_t at = pos_;
      uint8_t v = 0;
      PD_RETURN_IF_ERROR(read(v, "a bool value"));
      if (v > 1) return error(at, fmt::format("metadata '{}': bool value is {}, not 0 or 1", key, v));
      out.value = v == 1;
      break;
    }
    case GgufValueType::kString: {
      std::string s;
      PD_RETURN_IF_ERROR(read_string(s, "a string value"));
      out.value = std::move(s);
      break;
    }
    case GgufValueType::kArray: {
      uint64_t at = pos_;
      if (depth >= limits_.max_array_depth) {
        return error(
            at, fmt::format("metadata '{}': arrays nested deeper than {}", key, limits_.max_array_depth));
      }
      uint32_t elem_type = 0;
      uint64_t count = 0;
      PD_RETURN_IF_ERROR(read(elem_type, "an array element type"));
      if (!valid_value_type(elem_type)) {
        return error(at, fmt::format("metadata '{}': unknown array element type {}", key, elem_type));
      }
      PD_RETURN_IF_ERROR(read(count, "an array length"));
      auto et = static_cast<GgufValueType>(elem_type);
      uint64_t min_size = min_encoded_size(et);
      if (count > remaining() / min_size) {
        return error(at, fmt::format("metadata '{}': array of {} {} values cannot fit in the {} bytes left",
                                     key, count, value_type_name(et), remaining()));
      }
      GgufArray arr;
      arr.element_type = et;
      arr.items.resize(count);
      for (uint64_t i = 0; i < count; ++i) PD_RETURN_IF_ERROR(read_value(et, arr.items[i], depth + 1, key));
      out.value = std::move(arr);
      break;
    }
  }
  return ok_status();
}

Status GgufParser::parse(GgufFile& f) {
  uint32_t magic = 0;
  if (b_.size() < 4 || std::memcmp(b_.data(), "GGUF", 4) != 0) {
    return error(0, "not a GGUF file (the first four bytes are not 'GGUF')");
  }
  PD_RETURN_IF_ERROR(read(magic, "the magic"));
  uint64_t at = pos_;
  PD_RETURN_IF_ERROR(read(f.version_, "the version"));
  if (f.version_ != 2 && f.version_ != 3) {
    return error(at, fmt::format("GGUF version {} is not supported (versions 2 and 3 are); re-convert the "
                                 "model with a current llama.cpp",
                                 f.version_));
  }
  uint64_t tensor_count = 0, kv_count = 0;
  at = pos_;
  PD_RETURN_IF_ERROR(read(tensor_count, "the tensor count"));
  if (tensor_count > limits_.max_tensor_count || tensor_count > remaining() / 32) {
    return error(
        at, fmt::format("tensor count {} is impossible for a file of {} bytes", tensor_count, b_.size()));
  }
  at = pos_;
  PD_RETURN_IF_ERROR(read(kv_count, "the metadata count"));
  if (kv_count > limits_.max_kv_count || kv_count > remaining() / 13) {
    return error(at,
                 fmt::format("metadata count {} is impossible for a file of {} bytes", kv_count, b_.size()));
  }

  for (uint64_t i = 0; i < kv_count; ++i) {
    uint64_t kv_at = pos_;
    std::string key;
    PD_RETURN_IF_ERROR(read_string(key, "a metadata key"));
    uint32_t type = 0;
    uint64_t type_at = pos_;
    PD_RETURN_IF_ERROR(read(type, "a metadata value type"));
    if (!valid_value_type(type)) {
      return error(type_at, fmt::format("metadata '{}' has unknown value type {}", key, type));
    }
    GgufValue v;
    PD_RETURN_IF_ERROR(read_value(static_cast<GgufValueType>(type), v, 0, key));
    if (!f.metadata_.emplace(key, std::move(v)).second) {
      return error(kv_at, fmt::format("metadata key '{}' appears twice", key));
    }
  }

  if (const GgufValue* a = f.find("general.alignment")) {
    auto al = a->as_int("general.alignment");
    if (!al.ok() || *al <= 0 || *al > (1 << 20) || (*al & (*al - 1)) != 0) {
      return data_loss(
          fmt::format("gguf: general.alignment must be a power of two up to 1 MiB, got {}", a->to_display()));
    }
    f.alignment_ = static_cast<uint64_t>(*al);
  }

  f.tensors_.resize(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensorInfo& t = f.tensors_[i];
    uint64_t t_at = pos_;
    PD_RETURN_IF_ERROR(read_string(t.name, "a tensor name"));
    uint32_t n_dims = 0;
    at = pos_;
    PD_RETURN_IF_ERROR(read(n_dims, "a tensor's dimension count"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return error(at,
                   fmt::format("tensor '{}' has {} dimensions (1 to {} allowed)", t.name, n_dims, kMaxDims));
    }
    t.dims.resize(n_dims);
    uint64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      at = pos_;
      uint64_t ne = 0;
      PD_RETURN_IF_ERROR(read(ne, "a tensor dimension"));
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return error(at, fmt::format("tensor '{}' dimension {} is {}", t.name, d, ne));
      }
      if (elements > std::numeric_limits<uint64_t>::max() / ne || elements * ne > (1ull << 50)) {
        return error(
            at, fmt::format("tensor '{}' has too many elements (the product of its dimensions overflows)",
                            t.name));
      }
      elements *= ne;
      t.dims[d] = static_cast<int64_t>(ne);
    }
    uint32_t type = 0;
    at = pos_;
    PD_RETURN_IF_ERROR(read(type, "a tensor type"));
    auto info = ggml_type_info(type);
    if (!info) return error(at, fmt::format("tensor '{}' has unknown type id {}", t.name, type));
    t.type = static_cast<GgmlType>(type);
    if (static_cast<uint64_t>(t.dims[0]) % static_cast<uint64_t>(info->block_elements) != 0) {
      return error(at,
                   fmt::format("tensor '{}' of type {} has a row of {} elements, not a multiple of the block "
                               "size {}",
                               t.name, info->name, t.dims[0], info->block_elements));
    }
    t.size_bytes =
        elements / static_cast<uint64_t>(info->block_elements) * static_cast<uint64_t>(info->block_bytes);
    at = pos_;
    PD_RETURN_IF_ERROR(read(t.offset, "a tensor data offset"));
    if (t.offset % f.alignment_ != 0) {
      return error(at, fmt::format("tensor '{}' data offset {} is not a multiple of the alignment {}", t.name,
                                   t.offset, f.alignment_));
    }
    if (!f.tensor_index_.emplace(t.name, i).second) {
      return error(t_at, fmt::format("tensor name '{}' appears twice", t.name));
    }
  }

  // The data section starts at the next multiple of the alignment.
  uint64_t data = (pos_ + f.alignment_ - 1) / f.alignment_ * f.alignment_;
  if (tensor_count > 0 && data > b_.size()) {
    return error(
        pos_, fmt::format("the file ends before its data section (needs {} bytes, has {})", data, b_.size()));
  }
  f.data_offset_ = data;
  uint64_t data_size = data <= b_.size() ? b_.size() - data : 0;
  for (GgufTensorInfo& t : f.tensors_) {
    if (t.offset > data_size || t.size_bytes > data_size - t.offset) {
      return data_loss(
          fmt::format("gguf: tensor '{}' ({} bytes at data offset {}, byte {} of the file) extends past the "
                      "end of the file "
                      "({} bytes): the file is truncated or corrupt",
                      t.name, t.size_bytes, t.offset, data + t.offset, b_.size()));
    }
    t.data = b_.data() + data + t.offset;
  }
  return ok_status();
}

// ---------------------------------------------------------------------------------------------

StatusOr<int64_t> GgufValue::as_int(const std::string& key) const {
  if (const auto* u = std::get_if<uint64_t>(&value)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return invalid_argument(fmt::format("metadata '{}' = {} is too large", key, *u));
    }
    return static_cast<int64_t>(*u);
  }
  if (const auto* i = std::get_if<int64_t>(&value)) return *i;
  return invalid_argument(
      fmt::format("metadata '{}' is a {}, expected an integer", key, value_type_name(type)));
}

StatusOr<double> GgufValue::as_float(const std::string& key) const {
  if (const auto* d = std::get_if<double>(&value)) return *d;
  if (const auto* u = std::get_if<uint64_t>(&value)) return static_cast<double>(*u);
  if (const auto* i = std::get_if<int64_t>(&value)) return static_cast<double>(*i);
  return invalid_argument(
      fmt::format("metadata '{}' is a {}, expected a number", key, value_type_name(type)));
}

StatusOr<bool> GgufValue::as_bool(const std::string& key) const {
  if (const auto* b = std::get_if<bool>(&value)) return *b;
  return invalid_argument(fmt::format("metadata '{}' is a {}, expected a bool", key, value_type_name(type)));
}

StatusOr<std::string> GgufValue::as_string(const std::string& key) const {
  if (const auto* s = std::get_if<std::string>(&value)) return *s;
  return invalid_argument(
      fmt::format("metadata '{}' is a {}, expected a string", key, value_type_name(type)));
}

std::string GgufValue::to_display(size_t max_items) const {
  if (const auto* u = std::get_if<uint64_t>(&value)) return fmt::format("{}", *u);
  if (const auto* i = std::get_if<int64_t>(&value)) return fmt::format("{}", *i);
  if (const auto* d = std::get_if<double>(&value)) return fmt::format("{}", *d);
  if (const auto* b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (const auto* s = std::get_if<std::string>(&value)) {
    std::string out = "\"";
    for (char c : *s) {
      if (c == '\n')
        out += "\\n";
      else if (c == '"')
        out += "\\\"";
      else
        out += c;
    }
    return out + "\"";
  }
  const auto& arr = std::get<GgufArray>(value);
  std::string out = fmt::format("[{} x {}: ", arr.items.size(), value_type_name(arr.element_type));
  for (size_t i = 0; i < arr.items.size() && i < max_items; ++i) {
    if (i) out += ", ";
    out += arr.items[i].to_display(max_items);
  }
  if (arr.items.size() > max_items) out += ", ...";
  return out + "]";
}

int64_t GgufTensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::parse(std::span<const uint8_t> bytes,
                                                    const GgufLimits& limits) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->bytes_ = bytes;
  GgufParser parser(bytes, limits);
  PD_RETURN_IF_ERROR(parser.parse(*f));
  return f;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::parse_owned(std::vector<uint8_t> bytes,
                                                          const GgufLimits& limits) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->owned_ = std::move(bytes);
  f->bytes_ = f->owned_;
  GgufParser parser(f->bytes_, limits);
  PD_RETURN_IF_ERROR(parser.parse(*f));
  return f;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return Status(err == ENOENT ? StatusCode::kNotFound : StatusCode::kInvalidArgument,
                  fmt::format("cannot open model file '{}': {}. Pass --model PATH to use another file", path,
                              std::strerror(err)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(fmt::format("model path '{}' is not a regular file", path));
  }
  size_t size = static_cast<size_t>(st.st_size);
  void* map = nullptr;
  if (size > 0) {
    map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return internal_error(fmt::format("cannot map model file '{}': {}", path, std::strerror(err)));
    }
  }
  ::close(fd);
  std::span<const uint8_t> bytes(static_cast<const uint8_t*>(map), size);
  auto parsed = parse(bytes);
  if (!parsed.ok()) {
    if (map) ::munmap(map, size);
    return parsed.status().with_context(path);
  }
  std::unique_ptr<GgufFile> f = std::move(parsed).value();
  f->mapping_ = map;
  f->mapping_size_ = size;
  return f;
}

void GgufFile::release_pages(const uint8_t* p, size_t n) const {
  if (!mapping_) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  auto begin = reinterpret_cast<uintptr_t>(p), end = begin + n;
  auto map_begin = reinterpret_cast<uintptr_t>(mapping_), map_end = map_begin + mapping_size_;
  begin = std::max(begin, map_begin);
  end = std::min(end, map_end);
  begin = (begin + page - 1) / page * page;
  end = end / page * page;
  if (begin < end) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

GgufFile::~GgufFile() {
  if (mapping_) ::munmap(mapping_, mapping_size_);
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<int64_t> GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return not_found(fmt::format("model metadata has no '{}'", key));
  return v->as_int(key);
}
StatusOr<double> GgufFile::get_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return not_found(fmt::format("model metadata has no '{}'", key));
  return v->as_float(key);
}
StatusOr<std::string> GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return not_found(fmt::format("model metadata has no '{}'", key));
  return v->as_string(key);
}
StatusOr<int64_t> GgufFile::get_int_or(const std::string& key, int64_t fallback) const {
  const GgufValue* v = find(key);
  return v ? v->as_int(key) : StatusOr<int64_t>(fallback);
}
StatusOr<double> GgufFile::get_float_or(const std::string& key, double fallback) const {
  const GgufValue* v = find(key);
  return v ? v->as_float(key) : StatusOr<double>(fallback);
}
StatusOr<bool> GgufFile::get_bool_or(const std::string& key, bool fallback) const {
  const GgufValue* v = find(key);
  return v ? v->as_bool(key) : StatusOr<bool>(fallback);
}

uint64_t GgufFile::fingerprint() const {
  constexpr uint64_t kSample = 64 * 1024;
  const uint64_t header = std::min<uint64_t>(data_offset_, bytes_.size());
  uint64_t h = XXH3_64bits(bytes_.data(), header);
  const uint64_t data = bytes_.size() - header;
  const uint64_t head = std::min(kSample, data);
  h = XXH3_64bits_withSeed(bytes_.data() + header, head, h);
  const uint64_t tail = std::min(kSample, data);
  h = XXH3_64bits_withSeed(bytes_.data() + bytes_.size() - tail, tail, h);
  return h ^ bytes_.size();
}

}  // namespace pdserve
