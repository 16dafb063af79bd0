#include "kernel_timeline.h"

#if PDSERVE_HAVE_CUPTI

#include <cupti.h>
#include <cxxabi.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace pdserve::bench {
namespace {

struct Span {
  std::string what;  // kernel name and grid, or the kind of copy
  uint64_t start = 0, end = 0;
  bool kernel = false;
};

std::mutex g_mu;
std::vector<Span> g_spans;
std::vector<Span> g_marks;  // host moments: start == end

Status from_cupti(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return ok_status();
  const char* text = "unknown error";
  cuptiGetResultString(r, &text);
  return unavailable(fmt::format("{}: {} (CUPTI, the CUDA toolkit's profiling library)", what, text));
}

// "void ns::kernel<T, 4>(Args)" -> "ns::kernel"; names that do not demangle (cuBLAS's) stay as they are.
std::string short_name(const char* mangled) {
  if (mangled == nullptr) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : mangled;
  std::free(demangled);
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  const std::string anon = "(anonymous namespace)::";
  for (size_t at; (at = name.find(anon)) != std::string::npos;) name.erase(at, anon.size());
  const size_t cut = name.find_first_of("<(");
  if (cut != std::string::npos) name.resize(cut);
  if (name.size() > 72) name = name.substr(0, 69) + "...";
  return name;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  constexpr size_t kBytes = size_t{8} << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBytes));
  *size = *buffer != nullptr ? kBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mu);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      g_spans.push_back({fmt::format("{} [{}x{}x{}]", short_name(k->name), k->gridX, k->gridY, k->gridZ),
                         k->start, k->end, true});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      const char* kind = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "host to device"
                         : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "device to host"
                                                                          : "other";
      g_spans.push_back({fmt::format("copy, {}", kind), m->start, m->end});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      g_spans.push_back({"fill", m->start, m->end});
    }
  }
  std::free(buffer);
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_MEMSET};

}  // namespace

void timeline_mark(const char* what) {
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  std::lock_guard<std::mutex> lock(g_mu);
  g_marks.push_back({what, now, now});
}

Status timeline_start() {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_spans.clear();
    g_marks.clear();
  }
  PD_RETURN_IF_ERROR(
      from_cupti(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "register buffers"));
  for (CUpti_ActivityKind kind : kKinds)
    PD_RETURN_IF_ERROR(from_cupti(cuptiActivityEnable(kind), "enable activity records"));
  return ok_status();
}

Status timeline_discard() {
  PD_RETURN_IF_ERROR(from_cupti(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flush"));
  std::lock_guard<std::mutex> lock(g_mu);
  g_spans.clear();
  g_marks.clear();
  return ok_status();
}

Status timeline_stop(std::FILE* out) {
  PD_RETURN_IF_ERROR(from_cupti(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flush"));
  for (CUpti_ActivityKind kind : kKinds)
    PD_RETURN_IF_ERROR(from_cupti(cuptiActivityDisable(kind), "disable activity records"));
  std::vector<Span> spans, marks;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    spans.swap(g_spans);
    marks.swap(g_marks);
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
  // From the first kernel on: CUPTI itself slows a pass's first copy from pageable memory (the
  // model's table upload took 5.6-6.6 ms under it against 0.02-0.05 without, on an H100), so the
  // copies before the first kernel are listed apart and their time is not counted.
  const auto first_kernel = std::find_if(spans.begin(), spans.end(), [](const Span& x) { return x.kernel; });
  if (first_kernel == spans.end()) return internal_error("timeline: CUPTI recorded no kernel");
  for (auto it = spans.begin(); it != first_kernel; ++it)
    std::fprintf(out, "before the first kernel (not counted): %s, %.3f ms\n", it->what.c_str(),
                 (it->end - it->start) * 1e-6);
  spans.erase(spans.begin(), first_kernel);
  // Busy: the union of the spans (kernels of several streams may overlap); idle: the rest of the span.
  uint64_t busy = 0, covered_to = spans.front().start, last_end = 0;
  struct Total {
    uint64_t ns = 0;
    int count = 0;
  };
  std::map<std::string, Total> totals;
  // Idle time by the pair of kernels around it: which hand-offs between kernels cost the most.
  std::map<std::string, Total> gaps;
  const Span* before = nullptr;
  for (const Span& s : spans) {
    const uint64_t from = std::max(s.start, covered_to);
    if (s.end > from) busy += s.end - from;
    if (before != nullptr && s.start > covered_to) {
      Total& g = gaps[before->what + "  ->  " + s.what];
      g.ns += s.start - covered_to;
      ++g.count;
    }
    if (s.end >= covered_to) before = &s;
    covered_to = std::max(covered_to, s.end);
    last_end = std::max(last_end, s.end);
    Total& t = totals[s.what];
    t.ns += s.end - s.start;
    ++t.count;
  }
  const uint64_t span = last_end - spans.front().start;
  std::fprintf(out,
               "timeline: %zu kernels and copies; span %.3f ms, busy %.3f ms, idle between them %.3f ms\n",
               spans.size(), span * 1e-6, busy * 1e-6, (span - busy) * 1e-6);
  // The host's moments and, for each, the kernel or copy the GPU was in (or the next one).
  for (const Span& m : marks) {
    const auto next =
        std::find_if(spans.begin(), spans.end(), [&](const Span& s) { return s.end >= m.start; });
    const double at = (static_cast<double>(m.start) - static_cast<double>(spans.front().start)) * 1e-6;
    if (next == spans.end())
      std::fprintf(out, "host at %+.3f ms: %s (the GPU done)\n", at, m.what.c_str());
    else
      std::fprintf(out, "host at %+.3f ms: %s (the GPU %s %s, from %+.3f ms)\n", at, m.what.c_str(),
                   next->start <= m.start ? "in" : "idle until", next->what.c_str(),
                   (static_cast<double>(next->start) - static_cast<double>(spans.front().start)) * 1e-6);
  }
  std::vector<std::pair<std::string, Total>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::fprintf(out, "%10s %6s %10s %6s  %s\n", "total ms", "count", "mean us", "share", "kernel [grid]");
  for (const auto& [what, t] : rows)
    std::fprintf(out, "%10.3f %6d %10.1f %5.1f%%  %s\n", t.ns * 1e-6, t.count, t.ns * 1e-3 / t.count,
                 100.0 * t.ns / std::max<uint64_t>(busy, 1), what.c_str());
  std::vector<std::pair<std::string, Total>> idle(gaps.begin(), gaps.end());
  std::sort(idle.begin(), idle.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  if (idle.size() > 8) idle.resize(8);
  std::fprintf(out, "idle between kernels, the longest totals:\n%10s %6s %10s  %s\n", "total ms", "count",
               "mean us", "after  ->  before");
  for (const auto& [what, t] : idle)
    std::fprintf(out, "%10.3f %6d %10.1f  %s\n", t.ns * 1e-6, t.count, t.ns * 1e-3 / t.count, what.c_str());
  return ok_status();
}

}  // namespace pdserve::bench

#else  // built without CUPTI

namespace pdserve::bench {

static Status no_cupti() {
  return unavailable(
      "this pdserve_gpu_bench was built without CUPTI (the CUDA toolkit's libcupti), "
      "which the kernel timeline needs: install it with the toolkit and rebuild");
}
Status timeline_start() { return no_cupti(); }
Status timeline_discard() { return no_cupti(); }
void timeline_mark(const char*) {}
Status timeline_stop(std::FILE*) { return no_cupti(); }

}  // namespace pdserve::bench

#endif
