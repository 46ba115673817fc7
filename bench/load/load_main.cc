// normserve-load: sweeps batch size and concurrency against a normserve
// server and reports throughput, latency and errors per step (see
// load_runner.h for what is measured and how).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "bench/load/load_report.h"
#include "bench/load/load_runner.h"
#include "bench/load/load_stats.h"

#ifndef NORMSERVE_LOAD_PLOT_SCRIPT
#define NORMSERVE_LOAD_PLOT_SCRIPT "bench/load/plot_load.py"
#endif

namespace {

using normserve::load::LoadOptions;

constexpr char kUsage[] = R"(usage: normserve-load [flags]

Drives a normserve server with a sweep of steps (every batch size x every
concurrency) and reports, per step: requests/s, samples/s, MB/s each way,
latency p50/p90/p99/p99.9/max, errors by status code, and how many sampled
responses matched the double-precision reference. Warm-up is not counted.

target:
  --address HOST:PORT   server (default 127.0.0.1:50051)
  --tls_ca FILE         use TLS, trusting this PEM root certificate
workload:
  --batch_sizes LIST    N values: 1,2,4 or 1:1024:x2 or 8:64:+8 (default 1,8,64)
  --feature_shape LIST  C,*spatial of one sample (default 64,8,8)
  --dtype TYPE          float32 | float16 | bfloat16 (default float32)
  --layout L            nchw | nhwc (default nchw)
  --ops MIX             operation mix, e.g. train:1,forward:2,eval:1
                        (default forward). train = Forward + Backward +
                        OptimizerStep over a Train stream; forward = unary
                        training Forward; eval = unary eval Forward; sync
                        (alone) = a sync group's training step in tensor
                        mode, SyncForward + SyncBackward with one SGD step
  --sync_world_size K   ranks per sync group for --ops sync: worker i is
                        rank i % K of group i / K (default 2)
  --layers N            layers to create (default 0: one per worker)
  --concurrency LIST    workers (streams) per step (default 1)
  --channels N          gRPC channels (TCP connections) to spread them over
                        (default 1)
  --duration_s S        measured time per step (default 3)
  --requests N          measure N requests per step instead of a duration
  --warmup_s S          uncounted warm-up per step (default 0.5)
  --rate R              open loop: R requests/s per step, all workers
                        together, latency from the scheduled send time
                        (default 0: closed loop)
  --seed S              seed of inputs, parameters and the mix (default 1)
  --lr X                SGD learning rate of the train cycle (default 0.01)
  --timeout_s S         deadline of one call (default 60)
checks:
  --verify_every N      check the first and then one in N responses of each
                        worker against the reference (default 50; 0: off)
  --verify_max N        at most N checks per worker and step (default 4)
output:
  --json FILE           JSON report (format normserve.load.v1)
  --csv FILE            CSV, one row per step
  --plot FILE           PNG of throughput and p50/p99 latency against batch
                        size, one line per concurrency (needs --json and
                        python3-matplotlib)
  --plot_script FILE    the plotting script (default: the source tree's)
  --progress MODE       auto (a live line when stderr is a terminal) |
                        always | never (default auto)
  --quiet               no table at the end
  --help                print this and exit

Exit status: 0 when every request succeeded and every check passed, 3 when
some request failed or a check did not match, 1 when the sweep could not
run, 2 for a bad flag.
)";

[[noreturn]] void BadFlag(const std::string& message) {
  std::fprintf(stderr, "normserve-load: %s (see --help)\n", message.c_str());
  std::exit(2);
}

bool ParseFlag(int argc, char** argv, int* i, absl::string_view name,
               std::string* value) {
  absl::string_view arg = argv[*i];
  const std::string prefix = absl::StrCat("--", name);
  if (arg == prefix) {
    if (*i + 1 >= argc) BadFlag(absl::StrCat(prefix, " needs a value"));
    *value = argv[++*i];
    return true;
  }
  if (absl::StartsWith(arg, prefix + "=")) {
    *value = std::string(arg.substr(prefix.size() + 1));
    return true;
  }
  return false;
}

int64_t Int(absl::string_view flag, const std::string& value, int64_t min) {
  int64_t n = 0;
  if (!absl::SimpleAtoi(value, &n) || n < min) {
    BadFlag(
        absl::StrCat("--", flag, " ", value, ": expected an integer >= ", min));
  }
  return n;
}

double Double(absl::string_view flag, const std::string& value, double min) {
  double d = 0;
  if (!absl::SimpleAtod(value, &d) || !(d >= min)) {
    BadFlag(
        absl::StrCat("--", flag, " ", value, ": expected a number >= ", min));
  }
  return d;
}

bool WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) {
    std::fprintf(stderr, "normserve-load: cannot write %s\n", path.c_str());
    return false;
  }
  return true;
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

}  // namespace

int main(int argc, char** argv) {
  LoadOptions options;
  std::string json_path, csv_path, plot_path;
  std::string plot_script = NORMSERVE_LOAD_PLOT_SCRIPT;
  std::string progress = "auto";
  bool quiet = false;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "--quiet") {
      quiet = true;
    } else if (ParseFlag(argc, argv, &i, "address", &v)) {
      options.address = v;
    } else if (ParseFlag(argc, argv, &i, "tls_ca", &v)) {
      options.tls_ca_file = v;
    } else if (ParseFlag(argc, argv, &i, "batch_sizes", &v)) {
      auto list = normserve::load::ParseIntList(v);
      if (!list.ok())
        BadFlag(absl::StrCat("--batch_sizes ", list.status().message()));
      options.batch_sizes = *list;
    } else if (ParseFlag(argc, argv, &i, "feature_shape", &v)) {
      options.feature_shape.clear();
      for (absl::string_view d : absl::StrSplit(v, ',')) {
        options.feature_shape.push_back(
            Int("feature_shape", std::string(d), 1));
      }
      if (options.feature_shape.size() > 4) {
        BadFlag("--feature_shape: at most C and 3 spatial dimensions");
      }
    } else if (ParseFlag(argc, argv, &i, "dtype", &v)) {
      v = absl::AsciiStrToLower(v);
      if (v == "float32" || v == "f32") {
        options.dtype = normserve::v1::DTYPE_FLOAT32;
      } else if (v == "float16" || v == "f16" || v == "half") {
        options.dtype = normserve::v1::DTYPE_FLOAT16;
      } else if (v == "bfloat16" || v == "bf16") {
        options.dtype = normserve::v1::DTYPE_BFLOAT16;
      } else {
        BadFlag(absl::StrCat("--dtype ", v,
                             ": expected float32, float16 or bfloat16"));
      }
    } else if (ParseFlag(argc, argv, &i, "layout", &v)) {
      v = absl::AsciiStrToLower(v);
      if (v == "nchw") {
        options.layout = normserve::v1::LAYOUT_NCHW;
      } else if (v == "nhwc") {
        options.layout = normserve::v1::LAYOUT_NHWC;
      } else {
        BadFlag(absl::StrCat("--layout ", v, ": expected nchw or nhwc"));
      }
    } else if (ParseFlag(argc, argv, &i, "ops", &v)) {
      auto mix = normserve::load::ParseMix(v, normserve::load::OpNames());
      if (!mix.ok()) BadFlag(absl::StrCat("--ops ", mix.status().message()));
      options.mix.clear();
      for (const auto& [name, weight] : *mix) {
        const auto names = normserve::load::OpNames();
        const int index = static_cast<int>(
            std::find(names.begin(), names.end(), name) - names.begin());
        if (weight > 0) {
          options.mix.emplace_back(static_cast<normserve::load::Op>(index),
                                   weight);
        }
      }
    } else if (ParseFlag(argc, argv, &i, "sync_world_size", &v)) {
      options.sync_world_size = static_cast<int>(Int("sync_world_size", v, 1));
    } else if (ParseFlag(argc, argv, &i, "layers", &v)) {
      options.layers = static_cast<int>(Int("layers", v, 0));
    } else if (ParseFlag(argc, argv, &i, "concurrency", &v)) {
      auto list = normserve::load::ParseIntList(v);
      if (!list.ok())
        BadFlag(absl::StrCat("--concurrency ", list.status().message()));
      options.concurrency = *list;
    } else if (ParseFlag(argc, argv, &i, "channels", &v)) {
      options.channels = static_cast<int>(Int("channels", v, 1));
    } else if (ParseFlag(argc, argv, &i, "duration_s", &v)) {
      options.duration_s = Double("duration_s", v, 0.01);
    } else if (ParseFlag(argc, argv, &i, "requests", &v)) {
      options.requests = Int("requests", v, 0);
    } else if (ParseFlag(argc, argv, &i, "warmup_s", &v)) {
      options.warmup_s = Double("warmup_s", v, 0);
    } else if (ParseFlag(argc, argv, &i, "rate", &v)) {
      options.rate = Double("rate", v, 0);
    } else if (ParseFlag(argc, argv, &i, "seed", &v)) {
      options.seed = static_cast<uint64_t>(Int("seed", v, 0));
    } else if (ParseFlag(argc, argv, &i, "lr", &v)) {
      options.lr = Double("lr", v, 0);
    } else if (ParseFlag(argc, argv, &i, "timeout_s", &v)) {
      options.timeout_s = Double("timeout_s", v, 0.001);
    } else if (ParseFlag(argc, argv, &i, "verify_every", &v)) {
      options.verify_every = static_cast<int>(Int("verify_every", v, 0));
    } else if (ParseFlag(argc, argv, &i, "verify_max", &v)) {
      options.verify_max = static_cast<int>(Int("verify_max", v, 0));
    } else if (ParseFlag(argc, argv, &i, "json", &v)) {
      json_path = v;
    } else if (ParseFlag(argc, argv, &i, "csv", &v)) {
      csv_path = v;
    } else if (ParseFlag(argc, argv, &i, "plot", &v)) {
      plot_path = v;
    } else if (ParseFlag(argc, argv, &i, "plot_script", &v)) {
      plot_script = v;
    } else if (ParseFlag(argc, argv, &i, "progress", &v)) {
      if (v != "auto" && v != "always" && v != "never") {
        BadFlag(
            absl::StrCat("--progress ", v, ": expected auto, always or never"));
      }
      progress = v;
    } else {
      BadFlag(absl::StrCat("unknown flag ", arg));
    }
  }
  if (!plot_path.empty() && json_path.empty()) {
    BadFlag("--plot needs --json (the plot is drawn from the JSON report)");
  }
  for (int64_t k : options.concurrency) {
    if (k > 1024) BadFlag("--concurrency: at most 1024 workers");
  }
  options.progress =
      progress == "always" || (progress == "auto" && isatty(STDERR_FILENO));

  const normserve::load::RunInfo info = normserve::load::CurrentRunInfo();
  absl::StatusOr<std::vector<normserve::load::StepResult>> steps =
      normserve::load::RunSweep(options, nullptr);
  if (!steps.ok()) {
    std::fprintf(stderr, "normserve-load: %s\n",
                 steps.status().ToString().c_str());
    return 1;
  }
  if (!quiet) std::fputs(normserve::load::ReportTable(*steps).c_str(), stdout);

  bool ok = true;
  if (!json_path.empty()) {
    ok &= WriteFile(json_path,
                    normserve::load::ReportJson(options, info, *steps));
  }
  if (!csv_path.empty()) {
    ok &= WriteFile(csv_path, normserve::load::ReportCsv(*steps));
  }
  if (ok && !plot_path.empty()) {
    const char* python =
        access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
    const std::string command =
        absl::StrCat(python, " ", ShellQuote(plot_script), " ",
                     ShellQuote(json_path), " ", ShellQuote(plot_path));
    if (std::system(command.c_str()) != 0) {
      std::fprintf(stderr, "normserve-load: plotting failed: %s\n",
                   command.c_str());
      ok = false;
    }
  }
  if (!ok) return 1;

  int64_t failures = 0;
  for (const auto& s : *steps) {
    failures += s.error_count + s.verify_failed;
    for (const std::string& m : s.verify_messages) {
      std::fprintf(stderr, "normserve-load: check failed: %s\n", m.c_str());
    }
    for (const auto& [code, n] : s.errors) {
      std::fprintf(stderr,
                   "normserve-load: batch %lld concurrency %lld: %lld %s\n",
                   static_cast<long long>(s.batch_size),
                   static_cast<long long>(s.concurrency),
                   static_cast<long long>(n), code.c_str());
    }
  }
  return failures > 0 ? 3 : 0;
}
