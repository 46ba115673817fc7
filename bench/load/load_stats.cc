#include "bench/load/load_stats.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace normserve::load {
namespace {

constexpr size_t kMaxListValues = 10000;

absl::StatusOr<int64_t> ParsePositive(absl::string_view text,
                                      absl::string_view whole) {
  int64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", whole, "': '", text, "' is not an integer >= 1"));
  }
  return value;
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double n = static_cast<double>(sorted.size());
  // Rank in 1..n. The small slack keeps p * n / 100 that is an integer in
  // exact arithmetic (e.g. 99.9% of 1000) from rounding up past it.
  double rank = std::ceil(p / 100.0 * n - 1e-9);
  rank = std::clamp(rank, 1.0, n);
  return sorted[static_cast<size_t>(rank) - 1];
}

LatencySummary Summarize(std::vector<double>& values) {
  LatencySummary s;
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  s.min = values.front();
  s.max = values.back();
  s.mean = sum / static_cast<double>(values.size());
  s.p50 = Percentile(values, 50);
  s.p90 = Percentile(values, 90);
  s.p99 = Percentile(values, 99);
  s.p999 = Percentile(values, 99.9);
  return s;
}

Rates ComputeRates(int64_t requests, int64_t samples, int64_t bytes_sent,
                   int64_t bytes_received, double seconds) {
  Rates r;
  if (!(seconds > 0)) return r;
  r.requests_per_s = static_cast<double>(requests) / seconds;
  r.samples_per_s = static_cast<double>(samples) / seconds;
  r.mb_per_s_sent = static_cast<double>(bytes_sent) / 1e6 / seconds;
  r.mb_per_s_received = static_cast<double>(bytes_received) / 1e6 / seconds;
  return r;
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view text) {
  std::vector<int64_t> out;
  std::set<int64_t> seen;
  auto add = [&](int64_t v) -> absl::Status {
    if (seen.insert(v).second) out.push_back(v);
    if (out.size() > kMaxListValues) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", text, "' has more than ", kMaxListValues, " values"));
    }
    return absl::OkStatus();
  };
  if (text.empty()) {
    return absl::InvalidArgumentError("empty list; expected e.g. 1,2,4");
  }
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<absl::string_view> range = absl::StrSplit(part, ':');
    if (range.size() == 1) {
      absl::StatusOr<int64_t> v = ParsePositive(part, text);
      if (!v.ok()) return v.status();
      absl::Status status = add(*v);
      if (!status.ok()) return status;
      continue;
    }
    if (range.size() != 3 || range[2].size() < 2 ||
        (range[2][0] != 'x' && range[2][0] != '+')) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part,
                       "' is not a range; expected FIRST:LAST:xFACTOR "
                       "(e.g. 1:1024:x2) or FIRST:LAST:+STEP (e.g. 8:64:+8)"));
    }
    absl::StatusOr<int64_t> first = ParsePositive(range[0], text);
    if (!first.ok()) return first.status();
    absl::StatusOr<int64_t> last = ParsePositive(range[1], text);
    if (!last.ok()) return last.status();
    absl::StatusOr<int64_t> step = ParsePositive(range[2].substr(1), text);
    if (!step.ok()) return step.status();
    if (*last < *first) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part, "': LAST is smaller than FIRST"));
    }
    const bool geometric = range[2][0] == 'x';
    if (geometric && *step < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part, "': the factor must be at least 2"));
    }
    for (int64_t v = *first; v <= *last;) {
      absl::Status status = add(v);
      if (!status.ok()) return status;
      if (geometric) {
        if (v > *last / *step) break;
        v *= *step;
      } else {
        if (v > *last - *step) break;
        v += *step;
      }
    }
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<std::string, int>>> ParseMix(
    absl::string_view text, const std::vector<std::string>& known) {
  std::vector<std::pair<std::string, int>> out;
  int total = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(part, absl::MaxSplits(':', 1));
    const std::string name(kv.first);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown operation '", name, "' in '", text,
                       "'; expected ", absl::StrJoin(known, ", ")));
    }
    for (const auto& [seen, unused] : out) {
      if (seen == name) {
        return absl::InvalidArgumentError(absl::StrCat(
            "operation '", name, "' appears twice in '", text, "'"));
      }
    }
    int weight = 1;
    if (!kv.second.empty() &&
        (!absl::SimpleAtoi(kv.second, &weight) || weight < 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part, "': the weight must be an integer >= 0"));
    }
    if (part.find(':') != absl::string_view::npos && kv.second.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", part, "': the weight is missing"));
    }
    total += weight;
    out.emplace_back(name, weight);
  }
  if (total <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "': every weight is 0"));
  }
  return out;
}

int PickWeighted(const std::vector<int>& weights, int64_t u) {
  int64_t acc = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    acc += weights[i];
    if (u < acc) return static_cast<int>(i);
  }
  return static_cast<int>(weights.size()) - 1;
}

}  // namespace normserve::load
