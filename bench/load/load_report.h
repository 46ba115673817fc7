// The load generator's reports: JSON (everything), CSV (one row per step)
// and a one-line-per-step text table.
//
// JSON layout ("format": "normserve.load.v1"):
//   {"format", "tool", "started_at", "target", "machine": {...},
//    "config": {batch_sizes, feature_shape, dtype, layout, layers,
//               concurrency, channels, duration_s, requests, warmup_s, mix,
//               target_rate, seed, verify_every, verify_max, lr},
//    "steps": [{batch_size, concurrency, channels, layers, target_rate,
//               input_shape, input_bytes, window_s, requests, ok,
//               error_count, errors: {CODE: n}, unsent, requests_per_s,
//               samples_per_s, mb_per_s_sent, mb_per_s_received,
//               latency_ms: {count, min, mean, p50, p90, p99, p999, max},
//               verification: {verified, failed, skipped, messages},
//               ops: {NAME: {requests, ok, bytes_sent, bytes_received,
//                            latency_ms: {...}}}}],
//    "totals": {requests, ok, errors, verified, verify_failed}}
// A target_rate of 0 means closed loop.
#pragma once

#include <string>
#include <vector>

#include "bench/load/load_runner.h"

namespace normserve::load {

// Every key of a step object in the JSON report; tests check against it.
const std::vector<std::string>& StepJsonKeys();

struct RunInfo {
  std::string started_at;  // ISO 8601, UTC.
  std::string hostname;
  int cpus = 0;
  std::string cpu_model;
};

// Fills hostname, CPU count and model of this machine, and the time now.
RunInfo CurrentRunInfo();

std::string ReportJson(const LoadOptions& options, const RunInfo& info,
                       const std::vector<StepResult>& steps);

// Header plus one row per step; latencies in ms.
std::string ReportCsv(const std::vector<StepResult>& steps);

// A human-readable table, one line per step.
std::string ReportTable(const std::vector<StepResult>& steps);

// Returns JSON for `s`, quoted and escaped.
std::string JsonString(const std::string& s);
// Returns a JSON number (null for NaN or infinity).
std::string JsonNumber(double v);

}  // namespace normserve::load
