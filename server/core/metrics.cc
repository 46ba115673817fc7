#include "server/core/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"

namespace normserve::server::metrics {
namespace {

// A sample value as the exposition format writes it.
std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  // The shorter of 15 and 17 digits that reads back as the same double.
  char text[32];
  std::snprintf(text, sizeof(text), "%.15g", value);
  if (std::strtod(text, nullptr) != value) {
    std::snprintf(text, sizeof(text), "%.17g", value);
  }
  return text;
}

// A label value with \, " and newline escaped.
std::string EscapeLabel(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// {a="x",b="y"} (plus `extra`, already formatted, e.g. le="0.1"); "" when
// there are no labels at all.
std::string LabelSet(const std::vector<std::string>& names,
                     const std::vector<std::string>& values,
                     const std::string& extra = "") {
  std::string out;
  for (size_t i = 0; i < names.size() && i < values.size(); ++i) {
    absl::StrAppend(&out, out.empty() ? "" : ",", names[i], "=\"",
                    EscapeLabel(values[i]), "\"");
  }
  if (!extra.empty()) absl::StrAppend(&out, out.empty() ? "" : ",", extra);
  return out.empty() ? "" : absl::StrCat("{", out, "}");
}

void Header(std::string* out, const std::string& name, const std::string& help,
            const char* type) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type,
                  "\n");
}

std::atomic<bool> job_timing{false};

}  // namespace

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), counts_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds_->size(); ++i) counts_[i] = 0;
}

void Histogram::Observe(double value) {
  const size_t bucket =
      std::lower_bound(bounds_->begin(), bounds_->end(), value) -
      bounds_->begin();
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  double sum = sum_.load(std::memory_order_relaxed);
  while (!sum_.compare_exchange_weak(sum, sum + value,
                                     std::memory_order_relaxed)) {
  }
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot snapshot;
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    snapshot.cumulative.push_back(running);
  }
  snapshot.sum = sum_.load(std::memory_order_relaxed);
  return snapshot;
}

Registry& Registry::Default() {
  static Registry* const registry = new Registry;
  return *registry;
}

Family<Counter>& Registry::AddCounter(std::string name, std::string help,
                                      std::vector<std::string> labels) {
  absl::MutexLock lock(&mu_);
  counters_.push_back(std::make_unique<Family<Counter>>(
      std::move(name), std::move(help), std::move(labels),
      [] { return std::make_unique<Counter>(); }));
  return *counters_.back();
}

Family<Histogram>& Registry::AddHistogram(std::string name, std::string help,
                                          std::vector<std::string> labels,
                                          std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  bounds_.push_back(std::make_unique<std::vector<double>>(std::move(bounds)));
  const std::vector<double>* kept = bounds_.back().get();
  histograms_.push_back(std::make_unique<Family<Histogram>>(
      std::move(name), std::move(help), std::move(labels),
      [kept] { return std::make_unique<Histogram>(kept); }));
  return *histograms_.back();
}

int Registry::AddCollector(std::function<std::vector<GaugeFamily>()> collect) {
  absl::MutexLock lock(&mu_);
  collectors_.emplace(next_collector_, std::move(collect));
  return next_collector_++;
}

void Registry::RemoveCollector(int id) {
  absl::MutexLock lock(&mu_);  // Render holds it while collecting.
  collectors_.erase(id);
}

std::string Registry::Render() const {
  // name -> its text, so that the output is sorted by name.
  std::map<std::string, std::string> families;
  absl::MutexLock lock(&mu_);
  for (const auto& family : counters_) {
    std::string& out = families[family->name()];
    Header(&out, family->name(), family->help(), "counter");
    family->ForEach([&](const std::vector<std::string>& values,
                        const Counter& counter) {
      absl::StrAppend(&out, family->name(), LabelSet(family->labels(), values),
                      " ", counter.value(), "\n");
    });
  }
  for (const auto& family : histograms_) {
    std::string& out = families[family->name()];
    Header(&out, family->name(), family->help(), "histogram");
    family->ForEach([&](const std::vector<std::string>& values,
                        const Histogram& histogram) {
      const Histogram::Snapshot snapshot = histogram.Read();
      const std::vector<double>& bounds = histogram.bounds();
      for (size_t i = 0; i < snapshot.cumulative.size(); ++i) {
        const std::string le =
            i < bounds.size() ? FormatValue(bounds[i]) : "+Inf";
        absl::StrAppend(
            &out, family->name(), "_bucket",
            LabelSet(family->labels(), values, absl::StrCat("le=\"", le, "\"")),
            " ", snapshot.cumulative[i], "\n");
      }
      const std::string labels = LabelSet(family->labels(), values);
      absl::StrAppend(&out, family->name(), "_sum", labels, " ",
                      FormatValue(snapshot.sum), "\n", family->name(), "_count",
                      labels, " ", snapshot.cumulative.back(), "\n");
    });
  }
  std::map<std::string, GaugeFamily> gauges;
  for (const auto& [id, collect] : collectors_) {
    for (GaugeFamily& family : collect()) {
      auto [it, inserted] = gauges.emplace(family.name, family);
      if (!inserted) {
        for (GaugeFamily::Sample& sample : family.samples) {
          it->second.samples.push_back(std::move(sample));
        }
      }
    }
  }
  for (const auto& [name, family] : gauges) {
    std::string& out = families[name];
    Header(&out, name, family.help, "gauge");
    for (const GaugeFamily::Sample& sample : family.samples) {
      absl::StrAppend(&out, name, LabelSet(family.labels, sample.values), " ",
                      FormatValue(sample.value), "\n");
    }
  }
  std::string text;
  for (const auto& [name, family_text] : families) text += family_text;
  return text;
}

const std::vector<double>& LatencyBuckets() {
  static const auto* const buckets = new std::vector<double>{
      0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10};
  return *buckets;
}

const ServerMetrics& Server() {
  static const ServerMetrics* const server = [] {
    Registry& r = Registry::Default();
    auto* m = new ServerMetrics;
    m->requests = &r.AddCounter(
        "normserve_requests_total",
        "Calls answered (a Train stream counts once, when it ends), by "
        "method and gRPC status code.",
        {"method", "code"});
    m->duration = &r.AddHistogram(
        "normserve_request_duration_seconds",
        "Whole calls on the server, from their arrival to their status, by "
        "method.",
        {"method"}, LatencyBuckets());
    m->received_bytes = &r.AddCounter(
        "normserve_received_bytes_total",
        "Bytes of request messages received (serialized size), by method "
        "of normserve.v1.",
        {"method"});
    m->sent_bytes = &r.AddCounter(
        "normserve_sent_bytes_total",
        "Bytes of response messages sent (serialized size), by method of "
        "normserve.v1.",
        {"method"});
    m->queue_wait = &r.AddHistogram("normserve_queue_wait_seconds",
                                    "Time a job waited on its layer's strand "
                                    "and the executor before running.",
                                    {}, LatencyBuckets())
                         .With({});
    m->compute =
        &r.AddHistogram("normserve_compute_seconds",
                        "Time a job ran on an executor thread (kernels, "
                        "state changes, journal writes).",
                        {}, LatencyBuckets())
             .With({});
    return m;
  }();
  return *server;
}

void EnableJobTiming(bool on) {
  if (on) Server();  // Create the families before the first job.
  job_timing.store(on, std::memory_order_relaxed);
}

bool JobTimingEnabled() { return job_timing.load(std::memory_order_relaxed); }

}  // namespace normserve::server::metrics
