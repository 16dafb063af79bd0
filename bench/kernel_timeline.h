// Every kernel's start and end on the GPU as it ran among the others (CUPTI's activity records),
// for the benchmark's --timeline-* modes: where a forward pass's time goes when its kernels run back
// to back, which a profiler that replays each kernel alone (ncu) does not show, and how long the GPU
// sat idle between them.
#pragma once

#include <cstdio>

#include "common/status.h"

namespace pdserve::bench {

// Starts recording kernels, copies and fills on every stream.
Status timeline_start();

// Drops what was recorded so far and goes on recording: CUPTI sets itself up at the first calls it
// sees (milliseconds), so a pass run once under it and discarded leaves the next one undisturbed.
Status timeline_discard();

// A moment on the host, on the records' clock, printed by timeline_stop() among the kernels' times
// (what the host was doing while the GPU ran or waited).
void timeline_mark(const char* what);

// Stops recording (after the caller has synchronized the work it wants counted) and prints to `out`
// the span from the first kernel's start to the last end, the time busy and idle inside it, the
// host's moments, each kernel (name and grid) with its count and total time, longest first, and
// the longest idle hand-offs between kernels.
Status timeline_stop(std::FILE* out);

}  // namespace pdserve::bench
