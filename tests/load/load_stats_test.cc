#include "bench/load/load_stats.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "bench/load/load_report.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::load {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

std::vector<double> Range(int first, int last) {
  std::vector<double> v;
  for (int i = first; i <= last; ++i) v.push_back(i);
  return v;
}

TEST(PercentileTest, NearestRankOnOneToHundred) {
  const std::vector<double> v = Range(1, 100);
  EXPECT_EQ(Percentile(v, 50), 50);
  EXPECT_EQ(Percentile(v, 90), 90);
  EXPECT_EQ(Percentile(v, 99), 99);
  EXPECT_EQ(Percentile(v, 99.9), 100);
  EXPECT_EQ(Percentile(v, 100), 100);
  EXPECT_EQ(Percentile(v, 0.5), 1);
}

TEST(PercentileTest, ExactRanksDoNotRoundUp) {
  // 99.9% of 1000 is exactly rank 999, 50% of 4 exactly rank 2.
  EXPECT_EQ(Percentile(Range(1, 1000), 99.9), 999);
  EXPECT_EQ(Percentile({10, 20, 30, 40}, 50), 20);
  EXPECT_EQ(Percentile({10, 20, 30, 40}, 25), 10);
  EXPECT_EQ(Percentile({10, 20, 30, 40}, 26), 20);
  EXPECT_EQ(Percentile({10, 20, 30, 40}, 90), 40);
}

TEST(PercentileTest, SmallAndEmptyInputs) {
  EXPECT_EQ(Percentile({}, 50), 0);
  EXPECT_EQ(Percentile({7}, 50), 7);
  EXPECT_EQ(Percentile({7}, 99.9), 7);
  EXPECT_EQ(Percentile({1, 2}, 50), 1);
  EXPECT_EQ(Percentile({1, 2}, 51), 2);
}

TEST(SummarizeTest, UnsortedInput) {
  std::vector<double> v = Range(1, 1000);
  std::mt19937 rng(3);
  std::shuffle(v.begin(), v.end(), rng);
  const LatencySummary s = Summarize(v);
  EXPECT_EQ(s.count, 1000);
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 1000);
  EXPECT_DOUBLE_EQ(s.mean, 500.5);
  EXPECT_EQ(s.p50, 500);
  EXPECT_EQ(s.p90, 900);
  EXPECT_EQ(s.p99, 990);
  EXPECT_EQ(s.p999, 999);
}

TEST(SummarizeTest, OneOutlierShowsOnlyInTheTail) {
  std::vector<double> v(999, 1.0);
  v.push_back(250.0);
  const LatencySummary s = Summarize(v);
  EXPECT_EQ(s.p50, 1);
  EXPECT_EQ(s.p99, 1);
  EXPECT_EQ(s.p999, 1);
  EXPECT_EQ(s.max, 250);
  EXPECT_DOUBLE_EQ(s.mean, (999.0 + 250.0) / 1000.0);
}

TEST(SummarizeTest, Empty) {
  std::vector<double> v;
  const LatencySummary s = Summarize(v);
  EXPECT_EQ(s.count, 0);
  EXPECT_EQ(s.p50, 0);
  EXPECT_EQ(s.max, 0);
}

TEST(RatesTest, KnownCounts) {
  // 500 requests of batch 8 in 2 s, 1 MB out and 2 MB back.
  const Rates r = ComputeRates(500, 4000, 1000000, 2000000, 2.0);
  EXPECT_DOUBLE_EQ(r.requests_per_s, 250);
  EXPECT_DOUBLE_EQ(r.samples_per_s, 2000);
  EXPECT_DOUBLE_EQ(r.mb_per_s_sent, 0.5);
  EXPECT_DOUBLE_EQ(r.mb_per_s_received, 1.0);
}

TEST(RatesTest, EmptyWindowIsZero) {
  const Rates r = ComputeRates(10, 10, 10, 10, 0.0);
  EXPECT_EQ(r.requests_per_s, 0);
  EXPECT_EQ(r.samples_per_s, 0);
  EXPECT_EQ(r.mb_per_s_sent, 0);
  EXPECT_EQ(r.mb_per_s_received, 0);
}

TEST(ParseIntListTest, ListsAndRanges) {
  EXPECT_THAT(*ParseIntList("1,2,4"), ElementsAre(1, 2, 4));
  EXPECT_THAT(*ParseIntList("1:1024:x2"),
              ElementsAre(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024));
  EXPECT_THAT(*ParseIntList("1:100:x10"), ElementsAre(1, 10, 100));
  EXPECT_THAT(*ParseIntList("3:20:x4"), ElementsAre(3, 12));
  EXPECT_THAT(*ParseIntList("8:30:+8"), ElementsAre(8, 16, 24));
  EXPECT_THAT(*ParseIntList("5"), ElementsAre(5));
  // Mixed forms; a repeated value is kept once, in first position.
  EXPECT_THAT(*ParseIntList("1,2:8:x2,3"), ElementsAre(1, 2, 4, 8, 3));
}

TEST(ParseIntListTest, Errors) {
  for (const char* bad : {"", "0", "-1", "a", "1,,2", "1:4", "1:4:x1", "4:1:x2",
                          "1:4:y2", "1:4:+0", "1:4:x", "1:2:3:4"}) {
    absl::StatusOr<std::vector<int64_t>> r = ParseIntList(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(ParseIntList("1:20000:+1").status().message(),
              HasSubstr("more than 10000"));
  EXPECT_THAT(ParseIntList("4:1:x2").status().message(),
              HasSubstr("LAST is smaller than FIRST"));
}

TEST(ParseMixTest, WeightsAndDefaults) {
  const std::vector<std::string> known = {"train", "forward", "eval"};
  EXPECT_THAT(*ParseMix("train:1,forward:2", known),
              ElementsAre(Pair("train", 1), Pair("forward", 2)));
  EXPECT_THAT(*ParseMix("eval", known), ElementsAre(Pair("eval", 1)));
  EXPECT_THAT(*ParseMix("eval:0,train", known),
              ElementsAre(Pair("eval", 0), Pair("train", 1)));
}

TEST(ParseMixTest, Errors) {
  const std::vector<std::string> known = {"train", "forward", "eval"};
  EXPECT_THAT(ParseMix("backward", known).status().message(),
              HasSubstr("unknown operation 'backward'"));
  EXPECT_THAT(ParseMix("eval,eval:2", known).status().message(),
              HasSubstr("appears twice"));
  EXPECT_THAT(ParseMix("eval:-1", known).status().message(),
              HasSubstr("integer >= 0"));
  EXPECT_THAT(ParseMix("eval:", known).status().message(),
              HasSubstr("missing"));
  EXPECT_THAT(ParseMix("eval:0,train:0", known).status().message(),
              HasSubstr("every weight is 0"));
}

TEST(PickWeightedTest, CumulativeBuckets) {
  const std::vector<int> w = {1, 2, 0, 1};
  EXPECT_EQ(PickWeighted(w, 0), 0);
  EXPECT_EQ(PickWeighted(w, 1), 1);
  EXPECT_EQ(PickWeighted(w, 2), 1);
  EXPECT_EQ(PickWeighted(w, 3), 3);  // Weight 0 is never picked.
  // Over a full cycle each op is picked as often as its weight says.
  std::vector<int> counts(w.size());
  for (int u = 0; u < 4 * 100; ++u) ++counts[PickWeighted(w, u % 4)];
  EXPECT_THAT(counts, ElementsAre(100, 200, 0, 100));
}

TEST(ReportTest, JsonHasEveryStepFieldAndCsvIsRectangular) {
  StepResult s;
  s.batch_size = 8;
  s.concurrency = 2;
  s.total.requests = s.total.ok = 10;
  s.errors["UNAVAILABLE"] = 1;
  s.ops["forward"] = s.total;
  s.verify_messages.push_back("a \"quoted\"\nmessage");
  LoadOptions options;
  const std::string json = ReportJson(options, RunInfo(), {s, s});
  for (const std::string& key : StepJsonKeys()) {
    EXPECT_THAT(json, HasSubstr("\"" + key + "\": ")) << key;
  }
  EXPECT_THAT(json, HasSubstr("\"UNAVAILABLE\": 1"));
  EXPECT_THAT(json, HasSubstr("a \\\"quoted\\\"\\nmessage"));

  const std::string csv = ReportCsv({s, s});
  std::vector<std::string> lines = absl::StrSplit(csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u);
  const size_t columns = std::count(lines[0].begin(), lines[0].end(), ',');
  for (const std::string& line : lines) {
    EXPECT_EQ(std::count(line.begin(), line.end(), ','), columns) << line;
  }
}

TEST(ReportTest, JsonNumbers) {
  EXPECT_EQ(JsonNumber(1.5), "1.5");
  EXPECT_EQ(JsonNumber(1.0 / 0.0), "null");
  EXPECT_EQ(JsonString("tab\there"), "\"tab\\there\"");
}

}  // namespace
}  // namespace normserve::load
