#include "bench/load/load_report.h"

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cpp/tensor.h"

namespace normserve::load {
namespace {

std::string Latency(const LatencySummary& l) {
  return absl::StrCat(
      "{\"count\": ", l.count, ", \"min\": ", JsonNumber(l.min),
      ", \"mean\": ", JsonNumber(l.mean), ", \"p50\": ", JsonNumber(l.p50),
      ", \"p90\": ", JsonNumber(l.p90), ", \"p99\": ", JsonNumber(l.p99),
      ", \"p999\": ", JsonNumber(l.p999), ", \"max\": ", JsonNumber(l.max),
      "}");
}

std::string IntArray(const std::vector<int64_t>& v) {
  return absl::StrCat("[", absl::StrJoin(v, ", "), "]");
}

std::string MixString(const LoadOptions& options) {
  std::vector<std::string> parts;
  for (const auto& [op, weight] : options.mix) {
    parts.push_back(absl::StrCat(OpName(op), ":", weight));
  }
  return absl::StrJoin(parts, ",");
}

std::string StepJson(const StepResult& s) {
  std::vector<std::string> errors;
  for (const auto& [code, n] : s.errors) {
    errors.push_back(absl::StrCat(JsonString(code), ": ", n));
  }
  std::vector<std::string> messages;
  for (const std::string& m : s.verify_messages) {
    messages.push_back(JsonString(m));
  }
  std::vector<std::string> ops;
  for (const auto& [name, o] : s.ops) {
    ops.push_back(absl::StrCat(
        JsonString(name), ": {\"requests\": ", o.requests, ", \"ok\": ", o.ok,
        ", \"bytes_sent\": ", o.bytes_sent, ", \"bytes_received\": ",
        o.bytes_received, ", \"latency_ms\": ", Latency(o.latency_ms), "}"));
  }
  return absl::StrCat(
      "    {\"batch_size\": ", s.batch_size,
      ", \"concurrency\": ", s.concurrency, ", \"channels\": ", s.channels,
      ", \"layers\": ", s.layers,
      ", \"target_rate\": ", JsonNumber(s.target_rate),
      ",\n     \"input_shape\": ", IntArray(s.input_shape),
      ", \"input_bytes\": ", s.input_bytes,
      ", \"window_s\": ", JsonNumber(s.window_s),
      ",\n     \"requests\": ", s.total.requests, ", \"ok\": ", s.total.ok,
      ", \"error_count\": ", s.error_count, ", \"errors\": {",
      absl::StrJoin(errors, ", "), "}, \"unsent\": ", s.unsent,
      ",\n     \"requests_per_s\": ", JsonNumber(s.rates.requests_per_s),
      ", \"samples_per_s\": ", JsonNumber(s.rates.samples_per_s),
      ", \"mb_per_s_sent\": ", JsonNumber(s.rates.mb_per_s_sent),
      ", \"mb_per_s_received\": ", JsonNumber(s.rates.mb_per_s_received),
      ",\n     \"latency_ms\": ", Latency(s.total.latency_ms),
      ",\n     \"verification\": {\"verified\": ", s.verified,
      ", \"failed\": ", s.verify_failed, ", \"skipped\": ", s.verify_skipped,
      ", \"messages\": [", absl::StrJoin(messages, ", "), "]}",
      ",\n     \"ops\": {", absl::StrJoin(ops, ",\n             "), "}}");
}

}  // namespace

const std::vector<std::string>& StepJsonKeys() {
  static const std::vector<std::string> keys = {"batch_size",
                                                "concurrency",
                                                "channels",
                                                "layers",
                                                "target_rate",
                                                "input_shape",
                                                "input_bytes",
                                                "window_s",
                                                "requests",
                                                "ok",
                                                "error_count",
                                                "errors",
                                                "unsent",
                                                "requests_per_s",
                                                "samples_per_s",
                                                "mb_per_s_sent",
                                                "mb_per_s_received",
                                                "latency_ms",
                                                "verification",
                                                "ops"};
  return keys;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  return absl::StrFormat("%.6g", v);
}

RunInfo CurrentRunInfo() {
  RunInfo info;
  info.started_at =
      absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::Now(), absl::UTCTimeZone());
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) == 0) info.hostname = host;
  info.cpus = static_cast<int>(std::thread::hardware_concurrency());
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) {
        info.cpu_model = line.substr(colon + 2);
      }
      break;
    }
  }
  return info;
}

std::string ReportJson(const LoadOptions& options, const RunInfo& info,
                       const std::vector<StepResult>& steps) {
  std::vector<std::string> step_json;
  int64_t requests = 0, ok = 0, errors = 0, verified = 0, failed = 0;
  for (const StepResult& s : steps) {
    step_json.push_back(StepJson(s));
    requests += s.total.requests;
    ok += s.total.ok;
    errors += s.error_count;
    verified += s.verified;
    failed += s.verify_failed;
  }
  return absl::StrCat(
      "{\n  \"format\": \"normserve.load.v1\",\n  \"tool\": "
      "\"normserve-load\",\n  \"started_at\": ",
      JsonString(info.started_at),
      ",\n  \"target\": ", JsonString(options.address),
      ",\n  \"machine\": {\"hostname\": ", JsonString(info.hostname),
      ", \"cpus\": ", info.cpus,
      ", \"cpu_model\": ", JsonString(info.cpu_model),
      "},\n  \"config\": {\"batch_sizes\": ", IntArray(options.batch_sizes),
      ", \"feature_shape\": ", IntArray(options.feature_shape),
      ", \"dtype\": ", JsonString(client::DTypeName(options.dtype)),
      ", \"layout\": ",
      JsonString(options.layout == v1::LAYOUT_NHWC ? "nhwc" : "nchw"),
      ",\n             \"layers\": ", options.layers,
      ", \"concurrency\": ", IntArray(options.concurrency),
      ", \"channels\": ", options.channels,
      ", \"duration_s\": ", JsonNumber(options.duration_s),
      ", \"requests\": ", options.requests,
      ", \"warmup_s\": ", JsonNumber(options.warmup_s),
      ",\n             \"mix\": ", JsonString(MixString(options)),
      ", \"target_rate\": ", JsonNumber(options.rate),
      ", \"seed\": ", options.seed,
      ", \"verify_every\": ", options.verify_every,
      ", \"verify_max\": ", options.verify_max,
      ", \"lr\": ", JsonNumber(options.lr), "},\n  \"steps\": [\n",
      absl::StrJoin(step_json, ",\n"),
      "\n  ],\n  \"totals\": {\"requests\": ", requests, ", \"ok\": ", ok,
      ", \"errors\": ", errors, ", \"verified\": ", verified,
      ", \"verify_failed\": ", failed, "}\n}\n");
}

std::string ReportCsv(const std::vector<StepResult>& steps) {
  std::string out =
      "batch_size,concurrency,channels,layers,target_rate,input_bytes,"
      "window_s,requests,ok,errors,unsent,requests_per_s,samples_per_s,"
      "mb_per_s_sent,mb_per_s_received,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,"
      "mean_ms,verified,verify_failed,verify_skipped\n";
  for (const StepResult& s : steps) {
    const LatencySummary& l = s.total.latency_ms;
    absl::StrAppend(
        &out, absl::StrFormat(
                  "%d,%d,%d,%d,%g,%d,%.4f,%d,%d,%d,%d,%.6g,%.6g,%.6g,"
                  "%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%d,%d,%d\n",
                  s.batch_size, s.concurrency, s.channels, s.layers,
                  s.target_rate, s.input_bytes, s.window_s, s.total.requests,
                  s.total.ok, s.error_count, s.unsent, s.rates.requests_per_s,
                  s.rates.samples_per_s, s.rates.mb_per_s_sent,
                  s.rates.mb_per_s_received, l.p50, l.p90, l.p99, l.p999, l.max,
                  l.mean, s.verified, s.verify_failed, s.verify_skipped));
  }
  return out;
}

std::string ReportTable(const std::vector<StepResult>& steps) {
  std::string out = absl::StrFormat(
      "%6s %5s %9s %10s %9s %9s %8s %8s %8s %9s %6s %8s\n", "batch", "conc",
      "req/s", "samples/s", "MB/s out", "MB/s in", "p50 ms", "p99 ms",
      "p99.9 ms", "max ms", "errors", "verified");
  for (const StepResult& s : steps) {
    const LatencySummary& l = s.total.latency_ms;
    absl::StrAppend(
        &out, absl::StrFormat(
                  "%6d %5d %9.1f %10.1f %9.1f %9.1f %8.3f %8.3f %8.3f "
                  "%9.3f %6d %4d/%-3d\n",
                  s.batch_size, s.concurrency, s.rates.requests_per_s,
                  s.rates.samples_per_s, s.rates.mb_per_s_sent,
                  s.rates.mb_per_s_received, l.p50, l.p99, l.p999, l.max,
                  s.error_count, s.verified, s.verified + s.verify_failed));
  }
  return out;
}

}  // namespace normserve::load
