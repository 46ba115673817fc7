// Prometheus metrics of the server: counters, histograms and scrape-time
// gauges in one process-wide registry, rendered in the Prometheus text
// exposition format (version 0.0.4) for GET /metrics
// (server/grpc/metrics_http.h serves it).
//
// Names follow Prometheus' conventions: the normserve_ prefix, base units
// (seconds, bytes), _total on counters. Families are created once (at first
// use, see Registry::Default) and live as long as the process; a series of a
// family is created on the first Inc/Observe with its label values.
//
// Thread safety: every method may be called from any thread. Inc and
// Observe on a series are lock-free; looking a series up by label values
// takes the family's lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace normserve::server::metrics {

// A monotonically increasing count.
class Counter {
 public:
  void Inc(uint64_t by = 1) { value_.fetch_add(by, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// Observations counted into fixed buckets (upper bounds, ascending), with
// their sum.
class Histogram {
 public:
  explicit Histogram(const std::vector<double>* bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // Per bound, then +Inf.
    double sum = 0;
  };
  Snapshot Read() const;
  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  const std::vector<double>* const bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds + 1 (+Inf).
  std::atomic<double> sum_{0};
};

// One metric name with its label names; a series per label-value tuple.
template <typename Series>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> labels,
         std::function<std::unique_ptr<Series>()> make)
      : name_(std::move(name)),
        help_(std::move(help)),
        labels_(std::move(labels)),
        make_(std::move(make)) {}

  // The series for `values` (one per label name, in order), created on
  // first use. The reference stays valid for the family's lifetime.
  Series& With(const std::vector<std::string>& values) {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<Series>& series = series_[values];
    if (series == nullptr) series = make_();
    return *series;
  }

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& labels() const { return labels_; }
  // Calls fn(values, series) for every series, in label order.
  template <typename Fn>
  void ForEach(Fn fn) const {
    absl::MutexLock lock(&mu_);
    for (const auto& [values, series] : series_) fn(values, *series);
  }

 private:
  const std::string name_;
  const std::string help_;
  const std::vector<std::string> labels_;
  const std::function<std::unique_ptr<Series>()> make_;
  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<Series>> series_
      ABSL_GUARDED_BY(mu_);
};

// Gauges read at scrape time from whoever owns the value (a collector).
struct GaugeFamily {
  std::string name;
  std::string help;
  std::vector<std::string> labels;
  struct Sample {
    std::vector<std::string> values;
    double value = 0;
  };
  std::vector<Sample> samples;
};

class Registry {
 public:
  // The process-wide registry the server's metrics live in.
  static Registry& Default();

  Family<Counter>& AddCounter(std::string name, std::string help,
                              std::vector<std::string> labels = {});
  Family<Histogram>& AddHistogram(std::string name, std::string help,
                                  std::vector<std::string> labels,
                                  std::vector<double> bounds);

  // Adds `collect`, called at every scrape for its gauges, until the
  // returned id is passed to RemoveCollector (which waits for a scrape in
  // progress to finish with it).
  int AddCollector(std::function<std::vector<GaugeFamily>()> collect);
  void RemoveCollector(int id);

  // Every family in the text exposition format, sorted by name; collectors'
  // gauges of the same name are merged into one family.
  std::string Render() const;

 private:
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Family<Counter>>> counters_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Family<Histogram>>> histograms_
      ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<std::vector<double>>> bounds_
      ABSL_GUARDED_BY(mu_);
  std::map<int, std::function<std::vector<GaugeFamily>()>> collectors_
      ABSL_GUARDED_BY(mu_);
  int next_collector_ ABSL_GUARDED_BY(mu_) = 0;
};

// Bucket bounds in seconds for call and job latencies: 50 µs to 10 s.
const std::vector<double>& LatencyBuckets();

// The server's own metrics, in Registry::Default().
struct ServerMetrics {
  Family<Counter>* requests;        // normserve_requests_total{method,code}
  Family<Histogram>* duration;      // normserve_request_duration_seconds
  Family<Counter>* received_bytes;  // normserve_received_bytes_total
  Family<Counter>* sent_bytes;      // normserve_sent_bytes_total
  Histogram* queue_wait;            // normserve_queue_wait_seconds
  Histogram* compute;               // normserve_compute_seconds
};
const ServerMetrics& Server();

// Whether strands time their jobs into queue_wait and compute: off until a
// server with a metrics endpoint turns it on (the timing costs a clock read
// and an allocation per job).
void EnableJobTiming(bool on);
bool JobTimingEnabled();

}  // namespace normserve::server::metrics
