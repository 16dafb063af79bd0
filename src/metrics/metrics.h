// Metrics: counters, gauges and histograms, rendered in the Prometheus text exposition format
// (version 0.0.4, what `promtool check metrics` reads). Names follow Prometheus conventions:
// `pdserve_*`, counters end in `_total`, durations are `_seconds` (DESIGN.md §4).
//
// A Registry owns its metrics; the references it hands out stay valid as long as it lives, so hot
// paths look a metric up once and keep the reference. Families computed at scrape time (e.g. from
// an engine's snapshot) are added with add_collector() and written through a TextWriter.
//
// Thread-safety: updating a Counter, Gauge or Histogram is lock-free and may happen on any thread;
// Registry lookups, add_collector() and render() take the registry's mutex and are thread-safe.
// Collectors run inside render(), under that mutex: they must not call back into the registry.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pdserve::metrics {

// Label name/value pairs, in the order they are written.
using Labels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void inc(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void set(double v) { value_.store(v, std::memory_order_relaxed); }
  void inc(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  void dec(double v = 1.0) { value_.fetch_sub(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `upper_bounds`: strictly increasing, finite; the +Inf bucket is implicit.
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double v);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // per bound, then +Inf (== count)
    uint64_t count = 0;
    double sum = 0;
  };
  // Consistent enough for scraping: each bucket is read once, count is the +Inf bucket.
  Snapshot snapshot() const;
  const std::vector<double>& upper_bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1, not cumulative
  std::atomic<double> sum_{0.0};
};

// Bucket bounds: `count` values start, start*factor, start*factor^2, ...
std::vector<double> exponential_buckets(double start, double factor, int count);

// Writes metric families into the text exposition.
class TextWriter {
 public:
  explicit TextWriter(std::string* out) : out_(out) {}
  // "# HELP name help" and "# TYPE name type"; type is counter, gauge, histogram or untyped.
  void family(std::string_view name, std::string_view type, std::string_view help);
  // "name{labels} value".
  void sample(std::string_view name, const Labels& labels, double value);
  // A family with one unlabelled sample.
  void counter(std::string_view name, std::string_view help, double value);
  void gauge(std::string_view name, std::string_view help, double value);
  // The _bucket, _sum and _count samples of one histogram (the family header is separate).
  void histogram_samples(std::string_view name, const Labels& labels, const Histogram& h);

 private:
  std::string* out_;
};

class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Get-or-create. The first call for a name fixes its type and help (and, for histograms, the
  // bucket bounds); asking for the same name with another type is a programmer error (PD_CHECK).
  Counter& counter(std::string_view name, std::string_view help, const Labels& labels = {});
  Gauge& gauge(std::string_view name, std::string_view help, const Labels& labels = {});
  Histogram& histogram(std::string_view name, std::string_view help, std::span<const double> upper_bounds,
                       const Labels& labels = {});

  // `collect` writes further families on every render(), after the registry's own.
  void add_collector(std::function<void(TextWriter&)> collect);

  // The whole exposition.
  std::string render() const;

 private:
  struct Family;
  Family& family(std::string_view name, std::string_view type, std::string_view help);

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;             // guarded by mu_, in registration order
  std::vector<std::function<void(TextWriter&)>> collectors_;  // guarded by mu_
};

// The content type of the text exposition.
inline constexpr std::string_view kTextContentType = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace pdserve::metrics
