// Statistics of one load-generator step (percentiles, rates) and the parsers
// of the load generator's list flags. Pure functions, unit tested on known
// inputs (tests/load/load_stats_test.cc).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace normserve::load {

// Returns the nearest-rank percentile `p` (0 < p <= 100) of `sorted`
// (ascending): the smallest value v such that at least p% of the values are
// <= v, i.e. sorted[ceil(p / 100 * n) - 1]. p = 100 is the maximum. Returns 0
// for an empty input.
double Percentile(const std::vector<double>& sorted, double p);

// Latency distribution of one step, in the unit of the values given.
struct LatencySummary {
  int64_t count = 0;
  double min = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double p999 = 0;
  double max = 0;
};

// Summarizes `values` (any order; sorted in place).
LatencySummary Summarize(std::vector<double>& values);

// Throughput of one step over a window of `seconds` (> 0). A "sample" is one
// element of the batch dimension; MB is 10^6 bytes.
struct Rates {
  double requests_per_s = 0;
  double samples_per_s = 0;
  double mb_per_s_sent = 0;
  double mb_per_s_received = 0;
};

// Returns every rate as count / seconds; all zero when seconds <= 0.
Rates ComputeRates(int64_t requests, int64_t samples, int64_t bytes_sent,
                   int64_t bytes_received, double seconds);

// Parses a list of positive integers: "1,2,4,8", a geometric range
// "1:1024:x2" (first:last:xFACTOR, FACTOR >= 2), or an arithmetic range
// "8:64:+8" (first:last:+STEP); forms may be mixed with commas. The result
// keeps the order given, without duplicates. INVALID_ARGUMENT on anything
// else, on a value < 1, or on more than 10000 values.
absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view text);

// Parses an operation mix "train:1,forward:2,eval:1" (a name alone has
// weight 1) into (name, weight) pairs, checking names against `known`.
// INVALID_ARGUMENT on an unknown or repeated name, a weight that is not a
// non-negative integer, or a mix whose weights are all 0.
absl::StatusOr<std::vector<std::pair<std::string, int>>> ParseMix(
    absl::string_view text, const std::vector<std::string>& known);

// Returns the index of the operation to run for a value `u` uniform in
// [0, total weight): the first i with u < weight[0] + ... + weight[i].
int PickWeighted(const std::vector<int>& weights, int64_t u);

}  // namespace normserve::load
