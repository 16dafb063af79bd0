#include "model/safetensors.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "common/json_reader.h"

namespace pdserve {
namespace {

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // the format's own limit
constexpr size_t kMaxDims = 8;

// Bytes per element of every dtype the format defines (so other tensors' sizes are checked too).
size_t dtype_bytes(std::string_view name, SafetensorsDtype* dtype) {
  *dtype = SafetensorsDtype::kOther;
  if (name == "F32") return *dtype = SafetensorsDtype::kF32, 4;
  if (name == "F16") return *dtype = SafetensorsDtype::kF16, 2;
  if (name == "BF16") return *dtype = SafetensorsDtype::kBF16, 2;
  if (name == "F64" || name == "I64" || name == "U64") return 8;
  if (name == "I32" || name == "U32") return 4;
  if (name == "I16" || name == "U16") return 2;
  if (name == "I8" || name == "U8" || name == "BOOL" || name == "F8_E4M3" || name == "F8_E5M2") return 1;
  return 0;
}

StatusOr<std::string> read_text(const std::filesystem::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(fmt::format("cannot read '{}'", path.string()));
  std::ostringstream s;
  s << in.rdbuf();
  std::string text = s.str();
  if (text.size() > max_bytes)
    return invalid_argument(fmt::format("'{}' is larger than {} bytes", path.string(), max_bytes));
  return text;
}

}  // namespace

int64_t SafetensorsTensor::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::parse(std::span<const uint8_t> bytes,
                                                                  std::string source) {
  auto fail = [&](const std::string& what) { return invalid_argument(fmt::format("{}: {}", source, what)); };
  if (bytes.size() < 8) return fail("shorter than the 8-byte header length: not a safetensors file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  if (n > kMaxHeaderBytes || n > bytes.size() - 8)
    return fail(fmt::format("header length {} does not fit in the file of {} bytes", n, bytes.size()));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->header_ = std::string_view(reinterpret_cast<const char*>(bytes.data() + 8), static_cast<size_t>(n));
  PD_ASSIGN_OR_RETURN(JsonValue header, parse_json(f->header_, source + " header"));
  if (header.type != JsonValue::Type::kObject) return fail("the header is not a JSON object");
  const uint8_t* data = bytes.data() + 8 + n;
  const uint64_t data_size = bytes.size() - 8 - n;
  for (const JsonMember& member : header.object) {
    const std::string& name = member.key;
    const JsonValue& entry = member.value;
    if (name == "__metadata__") continue;
    auto bad = [&](const std::string& what) { return fail(fmt::format("tensor '{}': {}", name, what)); };
    if (entry.type != JsonValue::Type::kObject) return bad("its entry is not an object");
    const JsonValue* dtype = entry.find("dtype");
    const JsonValue* shape = entry.find("shape");
    const JsonValue* offsets = entry.find("data_offsets");
    if (dtype == nullptr || dtype->type != JsonValue::Type::kString) return bad("no \"dtype\" string");
    if (shape == nullptr || shape->type != JsonValue::Type::kArray) return bad("no \"shape\" array");
    if (offsets == nullptr || offsets->type != JsonValue::Type::kArray || offsets->array.size() != 2)
      return bad("no \"data_offsets\" pair");
    SafetensorsTensor t;
    t.name = name;
    t.dtype_name = dtype->string;
    const size_t elem = dtype_bytes(dtype->string, &t.dtype);
    if (elem == 0) return bad(fmt::format("unknown dtype '{}'", dtype->string));
    if (shape->array.size() > kMaxDims) return bad(fmt::format("{} dimensions", shape->array.size()));
    uint64_t count = 1;
    for (const JsonValue& d : shape->array) {
      if (!d.is_integer || d.integer < 0) return bad("a dimension that is not a non-negative integer");
      const auto dim = static_cast<uint64_t>(d.integer);
      if (dim != 0 && count > data_size / dim)
        return bad("its shape holds more elements than the file has bytes");
      count *= dim;
      t.shape.push_back(d.integer);
    }
    const JsonValue& b = offsets->array[0];
    const JsonValue& e = offsets->array[1];
    if (!b.is_integer || !e.is_integer || b.integer < 0 || e.integer < b.integer)
      return bad("data_offsets are not two ordered non-negative integers");
    const auto begin = static_cast<uint64_t>(b.integer), end = static_cast<uint64_t>(e.integer);
    if (end > data_size)
      return bad(fmt::format("its data ends at byte {} of a {}-byte data section", end, data_size));
    if (count > data_size / elem || end - begin != count * elem)
      return bad(fmt::format("{} bytes for {} elements of {}", end - begin, count, dtype->string));
    t.data = data + begin;
    t.bytes = static_cast<size_t>(end - begin);
    f->index_.emplace(t.name, f->tensors_.size());
    f->tensors_.push_back(std::move(t));
  }
  return f;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return Status(err == ENOENT ? StatusCode::kNotFound : StatusCode::kInvalidArgument,
                  fmt::format("cannot open '{}': {}", path, std::strerror(err)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(fmt::format("'{}' is not a regular file", path));
  }
  const auto size = static_cast<size_t>(st.st_size);
  void* map = nullptr;
  if (size > 0) {
    map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return internal_error(fmt::format("cannot map '{}': {}", path, std::strerror(err)));
    }
  }
  ::close(fd);
  auto parsed = parse(std::span<const uint8_t>(static_cast<const uint8_t*>(map), size), path);
  if (!parsed.ok()) {
    if (map != nullptr) ::munmap(map, size);
    return parsed.status();
  }
  (*parsed)->mapping_ = map;
  (*parsed)->mapping_size_ = size;
  return std::move(parsed).value();
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<ModelConfig> model_config_from_hf(std::string_view text, std::string_view source) {
  PD_ASSIGN_OR_RETURN(JsonValue j, parse_json(text, source));
  auto fail = [&](const std::string& what) { return invalid_argument(fmt::format("{}: {}", source, what)); };
  if (j.type != JsonValue::Type::kObject) return fail("not a JSON object");
  auto integer = [&](const char* key, int64_t fallback, int64_t max, int64_t* out) -> Status {
    const JsonValue* v = j.find(key);
    if (v == nullptr || v->type == JsonValue::Type::kNull) {
      if (fallback < 0) return fail(fmt::format("\"{}\" is missing", key));
      *out = fallback;
      return ok_status();
    }
    if (!v->is_integer || v->integer <= 0 || v->integer > max)
      return fail(fmt::format("\"{}\" must be an integer from 1 to {}", key, max));
    *out = v->integer;
    return ok_status();
  };
  auto number = [&](const JsonValue& obj, const char* key, double fallback, double* out) -> Status {
    const JsonValue* v = obj.find(key);
    if (v == nullptr || v->type == JsonValue::Type::kNull) {
      *out = fallback;
      return ok_status();
    }
    if (v->type != JsonValue::Type::kNumber || !(v->number > 0))
      return fail(fmt::format("\"{}\" must be a positive number", key));
    *out = v->number;
    return ok_status();
  };
  ModelConfig c;
  const JsonValue* type = j.find("model_type");
  if (type == nullptr || type->type != JsonValue::Type::kString) return fail("\"model_type\" is missing");
  if (type->string != "llama" && type->string != "qwen2")
    return unimplemented(
        fmt::format("{}: model_type '{}': pdserve runs llama and qwen2", source, type->string));
  c.architecture = type->string;
  c.name = type->string;
  int64_t layers, hidden, ffn, heads, kv_heads, head_dim, vocab, ctx;
  PD_RETURN_IF_ERROR(integer("num_hidden_layers", -1, 1024, &layers));
  PD_RETURN_IF_ERROR(integer("hidden_size", -1, 1 << 17, &hidden));
  PD_RETURN_IF_ERROR(integer("intermediate_size", -1, 1 << 19, &ffn));
  PD_RETURN_IF_ERROR(integer("num_attention_heads", -1, 1024, &heads));
  PD_RETURN_IF_ERROR(integer("num_key_value_heads", heads, heads, &kv_heads));
  if (hidden % heads != 0 && j.find("head_dim") == nullptr)
    return fail("hidden_size is not a multiple of num_attention_heads");
  PD_RETURN_IF_ERROR(integer("head_dim", hidden / heads, 1024, &head_dim));
  PD_RETURN_IF_ERROR(integer("vocab_size", -1, 1 << 22, &vocab));
  PD_RETURN_IF_ERROR(integer("max_position_embeddings", 4096, 1 << 24, &ctx));
  if (heads % kv_heads != 0) return fail("num_attention_heads is not a multiple of num_key_value_heads");
  c.num_layers = static_cast<int32_t>(layers);
  c.hidden_size = static_cast<int32_t>(hidden);
  c.ffn_size = static_cast<int32_t>(ffn);
  c.num_heads = static_cast<int32_t>(heads);
  c.num_kv_heads = static_cast<int32_t>(kv_heads);
  c.head_dim = static_cast<int32_t>(head_dim);
  c.rope_dim = c.head_dim;
  c.vocab_size = static_cast<int32_t>(vocab);
  c.context_length = static_cast<int32_t>(ctx);
  double eps = 1e-6, theta = 10000;
  PD_RETURN_IF_ERROR(number(j, "rms_norm_eps", 1e-6, &eps));
  PD_RETURN_IF_ERROR(number(j, "rope_theta", 10000, &theta));
  c.rms_norm_eps = static_cast<float>(eps);
  c.rope_theta = static_cast<float>(theta);
  c.rope_ordering = RopeOrdering::kNeox;  // Hugging Face's rotate_half
  const JsonValue* tie = j.find("tie_word_embeddings");
  c.tied_embeddings = tie != nullptr && tie->type == JsonValue::Type::kBool && tie->boolean;
  const JsonValue* bias = j.find("attention_bias");
  c.has_qkv_bias =
      c.architecture == "qwen2" || (bias != nullptr && bias->type == JsonValue::Type::kBool && bias->boolean);
  if (const JsonValue* rs = j.find("rope_scaling"); rs != nullptr && rs->type == JsonValue::Type::kObject) {
    const JsonValue* kind = rs->find("rope_type");
    if (kind == nullptr) kind = rs->find("type");
    if (kind == nullptr || kind->type != JsonValue::Type::kString || kind->string != "llama3")
      return unimplemented(fmt::format("{}: rope_scaling of a type other than llama3", source));
    double factor, low, high, orig;
    PD_RETURN_IF_ERROR(number(*rs, "factor", 8, &factor));
    PD_RETURN_IF_ERROR(number(*rs, "low_freq_factor", 1, &low));
    PD_RETURN_IF_ERROR(number(*rs, "high_freq_factor", 4, &high));
    PD_RETURN_IF_ERROR(number(*rs, "original_max_position_embeddings", 8192, &orig));
    if (high <= low) return fail("rope_scaling: high_freq_factor must exceed low_freq_factor");
    c.rope_scaling.factor = static_cast<float>(factor);
    c.rope_scaling.low_freq_factor = static_cast<float>(low);
    c.rope_scaling.high_freq_factor = static_cast<float>(high);
    c.rope_scaling.original_context_length = static_cast<int32_t>(orig);
  }
  return c;
}

StatusOr<std::unique_ptr<HfCheckpoint>> HfCheckpoint::open(const std::string& dir) {
  const std::filesystem::path root(dir);
  std::unique_ptr<HfCheckpoint> ck(new HfCheckpoint());
  PD_ASSIGN_OR_RETURN(std::string config_text, read_text(root / "config.json", size_t{1} << 20));
  PD_ASSIGN_OR_RETURN(ck->config_, model_config_from_hf(config_text, (root / "config.json").string()));
  std::vector<std::string> shard_names;
  const std::filesystem::path index = root / "model.safetensors.index.json";
  if (std::filesystem::exists(index)) {
    PD_ASSIGN_OR_RETURN(std::string index_text, read_text(index, size_t{64} << 20));
    PD_ASSIGN_OR_RETURN(JsonValue j, parse_json(index_text, index.string()));
    const JsonValue* map = j.find("weight_map");
    if (map == nullptr || map->type != JsonValue::Type::kObject)
      return invalid_argument(fmt::format("{}: no \"weight_map\" object", index.string()));
    std::set<std::string> seen;
    for (const auto& [tensor, file] : map->object) {
      if (file.type != JsonValue::Type::kString || file.string.empty() ||
          file.string.find('/') != std::string::npos || file.string.starts_with("."))
        return invalid_argument(
            fmt::format("{}: tensor '{}' names a bad shard file", index.string(), tensor));
      if (seen.insert(file.string).second) shard_names.push_back(file.string);
    }
  } else {
    shard_names.push_back("model.safetensors");
  }
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, config_text.data(), config_text.size());
  for (const std::string& name : shard_names) {
    auto shard = SafetensorsFile::open((root / name).string());
    if (!shard.ok()) {
      XXH3_freeState(state);
      return shard.status();
    }
    XXH3_64bits_update(state, (*shard)->header().data(), (*shard)->header().size());
    ck->shards_.push_back(std::move(shard).value());
  }
  ck->fingerprint_ = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return ck;
}

const SafetensorsTensor* HfCheckpoint::find(std::string_view name) const {
  for (const auto& shard : shards_) {
    if (const SafetensorsTensor* t = shard->find(name)) return t;
  }
  return nullptr;
}

}  // namespace pdserve
