// libFuzzer target: what `pdserve bench` reads from a server under test — SSE bodies, the JSON
// of each streamed event, error bodies, /metrics text, /v1/models and /tokenize answers — must
// never crash, hang or throw on arbitrary bytes. Also checks a property: an SSE body yields the
// same events whether it arrives whole or split into pieces (network reads split anywhere).
// Build with the `fuzz` preset (clang): tests/fuzz/run_fuzz.sh 60 sse_fuzz
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "bench/client.h"
#include "bench/report.h"
#include "bench/sse.h"

namespace {

std::vector<std::string> events_whole(std::string_view body) {
  pdserve::bench::SseParser p;
  std::vector<std::string> events;
  p.feed(body, events);
  p.finish(events);
  return events;
}

// The first byte picks the piece sizes (1..16 bytes, cycling), so every split point is reachable.
std::vector<std::string> events_split(std::string_view body, uint8_t seed) {
  pdserve::bench::SseParser p;
  std::vector<std::string> events;
  size_t step = 1 + (seed & 15u);
  for (size_t i = 0; i < body.size();) {
    size_t n = std::min(step, body.size() - i);
    p.feed(body.substr(i, n), events);
    i += n;
    step = 1 + ((step * 7 + seed) & 15u);
  }
  p.finish(events);
  return events;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t seed = data[0];
  std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);

  std::vector<std::string> whole = events_whole(body);
  if (events_split(body, seed) != whole) std::abort();  // splitting must not change the events

  pdserve::bench::RequestRecord record;
  for (const std::string& e : whole) {
    (void)pdserve::bench::apply_stream_event(e, 1.0, true, record);
  }
  (void)pdserve::bench::parse_prometheus_text(body);
  std::string text(body);
  (void)pdserve::bench::first_model_id(text);
  (void)pdserve::bench::tokenize_count(text);
  return 0;
}
