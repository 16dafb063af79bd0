#include "model/safetensors.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>

#include "common/json_reader.h"

namespace pdserve {
namespace {

// The format allows 100 MB; real headers are kilobytes (a few MB for thousands of tensors). Our
// limit, with the JSON reader's value budget, bounds the tree built from an untrusted header.
constexpr uint64_t kMaxHeaderBytes = uint64_t{16} << 20;
constexpr size_t kMaxJsonValues = size_t{1} << 20;
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

bool has_control_chars(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) return true;
  }
  return false;
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
  PD_ASSIGN_OR_RETURN(JsonValue header, parse_json(f->header_, source + " header", kMaxJsonValues));
  if (header.type != JsonValue::Type::kObject) return fail("the header is not a JSON object");
  const uint8_t* data = bytes.data() + 8 + n;
  const uint64_t data_size = bytes.size() - 8 - n;
  f->data_ = std::string_view(reinterpret_cast<const char*>(data), static_cast<size_t>(data_size));
  for (const JsonMember& member : header.object) {
    const std::string& name = member.key;
    const JsonValue& entry = member.value;
    if (name == "__metadata__") continue;
    if (has_control_chars(name)) return fail("a tensor name with control characters");
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
  // NOTE: O_NONBLOCK so a FIFO cannot block the open; it is refused as not a regular file below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
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
  auto number = [&](const JsonValue& obj, const char* key, double fallback, double min, double max,
                    double* out) -> Status {
    const JsonValue* v = obj.find(key);
    if (v == nullptr || v->type == JsonValue::Type::kNull) {
      *out = fallback;
      return ok_status();
    }
    if (v->type != JsonValue::Type::kNumber || !(v->number > min) || !(v->number <= max))
      return fail(fmt::format("\"{}\" must be a number above {} and at most {}", key, min, max));
    *out = v->number;
    return ok_status();
  };
  auto flag = [&](const char* key) {
    const JsonValue* v = j.find(key);
    return v != nullptr && v->type == JsonValue::Type::kBool && v->boolean;
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
  PD_RETURN_IF_ERROR(
      c.set_shape({layers, hidden, ffn, heads, kv_heads, head_dim, head_dim, ctx}).with_context(source));
  c.vocab_size = static_cast<int32_t>(vocab);
  // What pdserve does not compute is refused, never silently dropped.
  if (const JsonValue* act = j.find("hidden_act");
      act != nullptr && (act->type != JsonValue::Type::kString || act->string != "silu"))
    return unimplemented(fmt::format("{}: hidden_act other than silu", source));
  if (flag("mlp_bias")) return unimplemented(fmt::format("{}: mlp_bias (biases on the MLP)", source));
  if (c.architecture == "llama" && flag("attention_bias"))
    return unimplemented(fmt::format("{}: attention_bias (pdserve loads no o_proj bias)", source));
  if (flag("use_sliding_window")) return unimplemented(fmt::format("{}: use_sliding_window", source));
  // transformers 5 keeps rope_theta and the scaling inside "rope_parameters".
  const JsonValue* rope_params = j.find("rope_parameters");
  if (rope_params != nullptr && rope_params->type != JsonValue::Type::kObject) rope_params = nullptr;
  double eps = 1e-6, theta = 10000;
  PD_RETURN_IF_ERROR(number(j, "rms_norm_eps", 1e-6, 0, 0.1, &eps));
  const JsonValue& theta_from =
      rope_params != nullptr && rope_params->find("rope_theta") != nullptr ? *rope_params : j;
  PD_RETURN_IF_ERROR(number(theta_from, "rope_theta", 10000, 0, 1e12, &theta));
  c.rms_norm_eps = static_cast<float>(eps);
  c.rope_theta = static_cast<float>(theta);
  c.rope_ordering = RopeOrdering::kNeox;  // Hugging Face's rotate_half
  c.tied_embeddings = flag("tie_word_embeddings");
  c.has_qkv_bias = c.architecture == "qwen2" || flag("attention_bias");
  const JsonValue* rs = j.find("rope_scaling");
  if (rs == nullptr || rs->type != JsonValue::Type::kObject) rs = rope_params;
  if (rs != nullptr) {
    const JsonValue* kind = rs->find("rope_type");
    if (kind == nullptr) kind = rs->find("type");
    const bool none =
        kind == nullptr || (kind->type == JsonValue::Type::kString && kind->string == "default");
    if (!none) {
      if (kind->type != JsonValue::Type::kString || kind->string != "llama3")
        return unimplemented(fmt::format("{}: rope scaling of a type other than llama3", source));
      double factor, low, high;
      PD_RETURN_IF_ERROR(number(*rs, "factor", 8, 0.5, 1e4, &factor));
      PD_RETURN_IF_ERROR(number(*rs, "low_freq_factor", 1, 0, 1e4, &low));
      PD_RETURN_IF_ERROR(number(*rs, "high_freq_factor", 4, 0, 1e4, &high));
      int64_t orig_ctx = 8192;
      if (const JsonValue* orig = rs->find("original_max_position_embeddings"); orig != nullptr) {
        if (!orig->is_integer || orig->integer <= 0 || orig->integer > (1 << 24))
          return fail("rope scaling: original_max_position_embeddings must be an integer from 1 to 16777216");
        orig_ctx = orig->integer;
      }
      if (high <= low) return fail("rope scaling: high_freq_factor must exceed low_freq_factor");
      c.rope_scaling.factor = static_cast<float>(factor);
      c.rope_scaling.low_freq_factor = static_cast<float>(low);
      c.rope_scaling.high_freq_factor = static_cast<float>(high);
      c.rope_scaling.original_context_length = static_cast<int32_t>(orig_ctx);
    }
  }
  return c;
}

StatusOr<std::unique_ptr<HfCheckpoint>> HfCheckpoint::open(const std::string& dir) {
  const std::filesystem::path root(dir);
  std::unique_ptr<HfCheckpoint> ck(new HfCheckpoint());
  PD_ASSIGN_OR_RETURN(std::string config_text,
                      read_text_file((root / "config.json").string(), size_t{1} << 20));
  PD_ASSIGN_OR_RETURN(ck->config_, model_config_from_hf(config_text, (root / "config.json").string()));
  std::vector<std::string> shard_names;
  const std::filesystem::path index = root / "model.safetensors.index.json";
  std::error_code ec;
  if (std::filesystem::exists(index, ec)) {
    PD_ASSIGN_OR_RETURN(std::string index_text, read_text_file(index.string(), size_t{16} << 20));
    PD_ASSIGN_OR_RETURN(JsonValue j, parse_json(index_text, index.string(), kMaxJsonValues));
    const JsonValue* map = j.find("weight_map");
    if (map == nullptr || map->type != JsonValue::Type::kObject)
      return invalid_argument(fmt::format("{}: no \"weight_map\" object", index.string()));
    std::set<std::string> seen;
    for (const auto& [tensor, file] : map->object) {
      if (file.type != JsonValue::Type::kString || file.string.empty() ||
          file.string.find('/') != std::string::npos || file.string.starts_with(".") ||
          has_control_chars(file.string))
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
    // Samples of the data too (first and last 64 KiB): fine-tunes of one base share headers.
    const std::string_view data = (*shard)->data();
    const size_t sample = std::min<size_t>(data.size(), size_t{64} << 10);
    XXH3_64bits_update(state, data.data(), sample);
    XXH3_64bits_update(state, data.data() + data.size() - sample, sample);
    ck->shards_.push_back(std::move(shard).value());
  }
  // The tokenizer files where they are: instances and a gateway must read the same tokenizer too.
  for (const char* name :
       {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"}) {
    auto text = read_text_file((root / name).string(), size_t{256} << 20);
    if (!text.ok()) continue;  // absent (or unreadable: the tokenizer's reader says why)
    XXH3_64bits_update(state, name, std::strlen(name));
    XXH3_64bits_update(state, text->data(), text->size());
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

std::vector<const SafetensorsTensor*> HfCheckpoint::tensors() const {
  std::vector<const SafetensorsTensor*> all;
  for (const auto& shard : shards_) {
    for (const SafetensorsTensor& t : shard->tensors()) all.push_back(&t);
  }
  return all;
}

int64_t HfCheckpoint::num_parameters() const {
  int64_t n = 0;
  for (const SafetensorsTensor* t : tensors()) {
    // Not parameters: rotary tables some checkpoints store as buffers, and a stored copy of a
    // tied output head (the embedding, counted once).
    if (t->name.ends_with(".inv_freq")) continue;
    if (config_.tied_embeddings && t->name == "lm_head.weight") continue;
    n += t->num_elements();
  }
  return n;
}

}  // namespace pdserve
