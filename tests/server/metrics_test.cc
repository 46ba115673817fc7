// The metrics registry's exposition (server/core/metrics.h); the endpoint
// and the server's own metrics are tested end to end in tests/metrics.
#include "server/core/metrics.h"

#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::server::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(MetricsTest, CountersRenderPerLabelSetWithEscapedValues) {
  Registry registry;
  Family<Counter>& calls =
      registry.AddCounter("t_calls_total", "Calls.", {"method", "note"});
  calls.With({"Forward", "a\"b\\c\nd"}).Inc(3);
  calls.With({"Backward", "x"}).Inc();
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("# HELP t_calls_total Calls.\n"
                              "# TYPE t_calls_total counter\n"));
  EXPECT_THAT(text, HasSubstr("t_calls_total{method=\"Backward\",note=\"x\"} "
                              "1\n"));
  EXPECT_THAT(text, HasSubstr("t_calls_total{method=\"Forward\","
                              "note=\"a\\\"b\\\\c\\nd\"} 3\n"));
}

TEST(MetricsTest, HistogramBucketsAreCumulativeWithSumAndCount) {
  Registry registry;
  Histogram& h =
      registry.AddHistogram("t_seconds", "Time.", {}, {0.1, 1}).With({});
  for (double v : {0.05, 0.1, 0.5, 3.0}) h.Observe(v);
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("# TYPE t_seconds histogram\n"
                              "t_seconds_bucket{le=\"0.1\"} 2\n"
                              "t_seconds_bucket{le=\"1\"} 3\n"
                              "t_seconds_bucket{le=\"+Inf\"} 4\n"
                              "t_seconds_sum 3.65\n"
                              "t_seconds_count 4\n"));
}

TEST(MetricsTest, ConcurrentObservationsAreAllCounted) {
  Registry registry;
  Histogram& h = registry.AddHistogram("t_h", "H.", {}, {1}).With({});
  Counter& c = registry.AddCounter("t_c_total", "C.").With({});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        h.Observe(0.5);
        c.Inc();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(c.value(), 40000u);
  EXPECT_EQ(h.Read().cumulative.back(), 40000u);
  EXPECT_DOUBLE_EQ(h.Read().sum, 20000);
}

TEST(MetricsTest, CollectorsMergeByNameUntilRemoved) {
  Registry registry;
  const auto collector = [](double v) {
    return [v] {
      return std::vector<GaugeFamily>{
          {"t_layers", "Layers.", {"kind"}, {{{"bn"}, v}}}};
    };
  };
  const int a = registry.AddCollector(collector(2));
  const int b = registry.AddCollector(collector(5));
  std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("# TYPE t_layers gauge\n"
                              "t_layers{kind=\"bn\"} 2\n"
                              "t_layers{kind=\"bn\"} 5\n"));
  registry.RemoveCollector(a);
  registry.RemoveCollector(b);
  EXPECT_THAT(registry.Render(), Not(HasSubstr("t_layers")));
}

}  // namespace
}  // namespace normserve::server::metrics
