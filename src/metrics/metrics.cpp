#include "metrics/metrics.h"

#include <fmt/format.h>

#include <cmath>
#include <variant>

#include "common/check.h"

namespace pdserve::metrics {

namespace {

void append_number(std::string* out, double v) {
  if (std::isnan(v)) {
    *out += "NaN";
  } else if (std::isinf(v)) {
    *out += v > 0 ? "+Inf" : "-Inf";
  } else if (v == std::floor(v) && std::fabs(v) < 1e15) {
    fmt::format_to(std::back_inserter(*out), "{}", static_cast<int64_t>(v));
  } else {
    fmt::format_to(std::back_inserter(*out), "{}", v);  // shortest round-trip form
  }
}

// Label values escape backslash, double quote and newline; HELP text backslash and newline.
void append_escaped(std::string* out, std::string_view s, bool quote) {
  for (char c : s) {
    if (c == '\\') {
      *out += "\\\\";
    } else if (c == '\n') {
      *out += "\\n";
    } else if (quote && c == '"') {
      *out += "\\\"";
    } else {
      *out += c;
    }
  }
}

void append_labels(std::string* out, const Labels& labels, std::string_view extra_name = {},
                   std::string_view extra_value = {}) {
  if (labels.empty() && extra_name.empty()) return;
  *out += '{';
  bool first = true;
  auto one = [&](std::string_view k, std::string_view v) {
    if (!first) *out += ',';
    first = false;
    *out += k;
    *out += "=\"";
    append_escaped(out, v, true);
    *out += '"';
  };
  for (const auto& [k, v] : labels) one(k, v);
  if (!extra_name.empty()) one(extra_name, extra_value);
  *out += '}';
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    PD_CHECK(std::isfinite(bounds_[i]));
    if (i > 0) PD_CHECK(bounds_[i] > bounds_[i - 1]);
  }
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;  // "le": a value on a bound belongs to it
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.cumulative.resize(bounds_.size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = acc;
  }
  s.count = acc;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> exponential_buckets(double start, double factor, int count) {
  PD_CHECK(start > 0 && factor > 1 && count > 0);
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i) {
    b.push_back(v);
    v *= factor;
  }
  return b;
}

void TextWriter::family(std::string_view name, std::string_view type, std::string_view help) {
  *out_ += "# HELP ";
  *out_ += name;
  *out_ += ' ';
  append_escaped(out_, help, false);
  *out_ += "\n# TYPE ";
  *out_ += name;
  *out_ += ' ';
  *out_ += type;
  *out_ += '\n';
}

void TextWriter::sample(std::string_view name, const Labels& labels, double value) {
  *out_ += name;
  append_labels(out_, labels);
  *out_ += ' ';
  append_number(out_, value);
  *out_ += '\n';
}

void TextWriter::counter(std::string_view name, std::string_view help, double value) {
  family(name, "counter", help);
  sample(name, {}, value);
}

void TextWriter::gauge(std::string_view name, std::string_view help, double value) {
  family(name, "gauge", help);
  sample(name, {}, value);
}

void TextWriter::histogram_samples(std::string_view name, const Labels& labels, const Histogram& h) {
  Histogram::Snapshot s = h.snapshot();
  const auto& bounds = h.upper_bounds();
  std::string le;
  for (size_t i = 0; i <= bounds.size(); ++i) {
    le.clear();
    append_number(&le, i < bounds.size() ? bounds[i] : INFINITY);
    *out_ += name;
    *out_ += "_bucket";
    append_labels(out_, labels, "le", le);
    *out_ += ' ';
    append_number(out_, static_cast<double>(s.cumulative[i]));
    *out_ += '\n';
  }
  *out_ += name;
  *out_ += "_sum";
  append_labels(out_, labels);
  *out_ += ' ';
  append_number(out_, s.sum);
  *out_ += '\n';
  *out_ += name;
  *out_ += "_count";
  append_labels(out_, labels);
  *out_ += ' ';
  append_number(out_, static_cast<double>(s.count));
  *out_ += '\n';
}

struct Registry::Family {
  std::string name;
  std::string type;
  std::string help;
  std::vector<double> bounds;  // histograms
  struct Child {
    Labels labels;
    std::variant<std::unique_ptr<Counter>, std::unique_ptr<Gauge>, std::unique_ptr<Histogram>> metric;
  };
  std::vector<Child> children;

  Child* find(const Labels& labels) {
    for (Child& c : children) {
      if (c.labels == labels) return &c;
    }
    return nullptr;
  }
};

Registry::Registry() = default;
Registry::~Registry() = default;

Registry::Family& Registry::family(std::string_view name, std::string_view type, std::string_view help) {
  for (auto& f : families_) {
    if (f->name == name) {
      PD_CHECK_MSG(f->type == type, "a metric was registered twice with different types");
      return *f;
    }
  }
  auto f = std::make_unique<Family>();
  f->name = std::string(name);
  f->type = std::string(type);
  f->help = std::string(help);
  families_.push_back(std::move(f));
  return *families_.back();
}

Counter& Registry::counter(std::string_view name, std::string_view help, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, "counter", help);
  if (Family::Child* c = f.find(labels)) return *std::get<std::unique_ptr<Counter>>(c->metric);
  f.children.push_back({labels, std::make_unique<Counter>()});
  return *std::get<std::unique_ptr<Counter>>(f.children.back().metric);
}

Gauge& Registry::gauge(std::string_view name, std::string_view help, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, "gauge", help);
  if (Family::Child* c = f.find(labels)) return *std::get<std::unique_ptr<Gauge>>(c->metric);
  f.children.push_back({labels, std::make_unique<Gauge>()});
  return *std::get<std::unique_ptr<Gauge>>(f.children.back().metric);
}

Histogram& Registry::histogram(std::string_view name, std::string_view help,
                               std::span<const double> upper_bounds, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, "histogram", help);
  if (f.children.empty()) f.bounds.assign(upper_bounds.begin(), upper_bounds.end());
  if (Family::Child* c = f.find(labels)) return *std::get<std::unique_ptr<Histogram>>(c->metric);
  f.children.push_back({labels, std::make_unique<Histogram>(f.bounds)});
  return *std::get<std::unique_ptr<Histogram>>(f.children.back().metric);
}

void Registry::add_collector(std::function<void(TextWriter&)> collect) {
  std::lock_guard<std::mutex> lock(mu_);
  collectors_.push_back(std::move(collect));
}

std::string Registry::render() const {
  std::string out;
  TextWriter w(&out);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    if (f->children.empty()) continue;
    w.family(f->name, f->type, f->help);
    for (const auto& c : f->children) {
      if (const auto* counter = std::get_if<std::unique_ptr<Counter>>(&c.metric)) {
        w.sample(f->name, c.labels, (*counter)->value());
      } else if (const auto* gauge = std::get_if<std::unique_ptr<Gauge>>(&c.metric)) {
        w.sample(f->name, c.labels, (*gauge)->value());
      } else {
        w.histogram_samples(f->name, c.labels, *std::get<std::unique_ptr<Histogram>>(c.metric));
      }
    }
  }
  for (const auto& collect : collectors_) collect(w);
  return out;
}

}  // namespace pdserve::metrics
