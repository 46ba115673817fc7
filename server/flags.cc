#include "server/flags.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/version.h"

namespace normserve::server {

// An integer flag's value, at least kMin; anything else is refused with
// "expected an integer >= kMin" when the flag is parsed.
template <int64_t kMin>
struct AtLeast {
  // Implicit: ABSL_FLAG's default is a plain integer.
  constexpr AtLeast(int64_t v = kMin) : value(v) {}  // NOLINT
  int64_t value;
};

template <int64_t kMin>
bool AbslParseFlag(absl::string_view text, AtLeast<kMin>* flag,
                   std::string* error) {
  if (!absl::SimpleAtoi(text, &flag->value) || flag->value < kMin) {
    *error = absl::StrCat("expected an integer >= ", kMin);
    return false;
  }
  return true;
}

template <int64_t kMin>
std::string AbslUnparseFlag(AtLeast<kMin> flag) {
  return absl::StrCat(flag.value);
}

// --fsync always|interval.
bool AbslParseFlag(absl::string_view text, FsyncPolicy* policy,
                   std::string* error) {
  if (text == "always") {
    *policy = FsyncPolicy::kAlways;
  } else if (text == "interval") {
    *policy = FsyncPolicy::kInterval;
  } else {
    *error = "expected always or interval";
    return false;
  }
  return true;
}

std::string AbslUnparseFlag(FsyncPolicy policy) {
  return policy == FsyncPolicy::kInterval ? "interval" : "always";
}

}  // namespace normserve::server

using normserve::server::AtLeast;
using normserve::server::FsyncPolicy;

// The flags, by name as --help lists them. --help prints each help text
// after the flag's name and follows it with "(default: ...)".
ABSL_FLAG(std::string, address, "127.0.0.1:50051",
          "where to listen, HOST:PORT; port 0 picks a free port, printed at "
          "start");
ABSL_FLAG(std::string, auth_tokens, "",
          "FILE of bearer tokens, one 'TOKEN TENANT' a line ('#' comments); "
          "every call but health checks then needs 'authorization: Bearer "
          "TOKEN', and layers belong to the tenant that created them");
ABSL_FLAG(AtLeast<0>, cpu_threads, 0,
          "threads per CPU kernel; 0 means every core");
ABSL_FLAG(std::string, device, "auto",
          "auto | cpu | cuda | cuda:N; auto is the first GPU when there is "
          "one, else the CPU");
ABSL_FLAG(FsyncPolicy, fsync, FsyncPolicy::kAlways,
          "always | interval: always fsyncs before each mutation is "
          "acknowledged (group commit); interval fsyncs every "
          "--fsync_interval_ms (a machine crash may lose that window, a "
          "process crash loses nothing)");
ABSL_FLAG(AtLeast<1>, fsync_interval_ms, 100,
          "the interval of --fsync interval, in milliseconds");
ABSL_FLAG(std::string, health_address, "",
          "HOST:PORT to also listen on, in plaintext, for "
          "grpc.health.v1.Health only (no other service, no reflection, no "
          "token needed): for probes that cannot speak TLS, e.g. Kubernetes' "
          "gRPC probes");
ABSL_FLAG(AtLeast<1>, max_layers, 10000, "layers held at once");
ABSL_FLAG(std::string, metrics_address, "",
          "HOST:PORT to serve Prometheus metrics on, over plain HTTP "
          "(GET /metrics; port 0 picks a free one); empty: none");
ABSL_FLAG(AtLeast<0>, max_layers_per_tenant, 0,
          "layers one tenant holds at once; 0 means only --max_layers "
          "applies");
ABSL_FLAG(AtLeast<1>, max_message_mb, 512,
          "largest request in MiB; a larger tensor gets RESOURCE_EXHAUSTED");
ABSL_FLAG(AtLeast<1>, max_saved_contexts, 1024,
          "saved forward contexts kept for Backward");
ABSL_FLAG(AtLeast<1>, max_saved_mb, 2048,
          "memory for inputs saved for Backward, in MiB; oldest evicted "
          "first");
ABSL_FLAG(AtLeast<0>, max_state_mb, 0,
          "memory for layer state (parameters, statistics, gradients, "
          "optimizer buffers) of all layers, in MiB; 0 means no limit");
ABSL_FLAG(AtLeast<0>, max_streams, 0,
          "Train streams open at once; 0 means no limit");
ABSL_FLAG(AtLeast<0>, shutdown_grace_s, 10,
          "on SIGTERM/SIGINT, seconds for in-flight calls to finish");
ABSL_FLAG(AtLeast<1>, snapshot_every, 10000, "log records between snapshots");
ABSL_FLAG(std::string, state_dir, "",
          "DIR to keep every layer durable in (write-ahead log and "
          "snapshots; docs/persistence.md); without it state lives in memory "
          "and a restart loses it");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain FILE: serve TLS (with --tls_key)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle FILE: require client certificates signed by it "
          "(mutual TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key FILE of --tls_cert");
ABSL_FLAG(AtLeast<0>, workers, 0, "executor threads; 0 means every core");

namespace normserve::server {
namespace {

constexpr char kUsageHead[] =
    R"(usage: normserve [flags]

Serves stateful normalization layers (BatchNorm) over gRPC
(service normserve.v1.Normalization, with grpc.health.v1 and reflection).
A flag's value follows it: --flag=value or --flag value.

flags:
)";

constexpr char kUsageTail[] =
    R"(  --help                  print this and exit (--helpfull: also the flags
                          of the libraries linked in, which normserve does
                          not let you set)
  --version               print the version and exit

environment:
  TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES
                          what tcmalloc's per-thread caches may hold together
                          (default here 4 MiB; the start-up output names the
                          allocator and the value in effect)
)";

// Usage layout: "  --name" in the first kHelpColumn columns, the help text
// wrapped to kWidth.
constexpr size_t kHelpColumn = 26;
constexpr size_t kWidth = 79;

[[noreturn]] void Fail(absl::string_view message) {
  std::fprintf(stderr, "normserve: %s\n", std::string(message).c_str());
  std::exit(2);
}

// The file that declares our flags, as absl reports it (absl may normalize
// __FILE__).
const std::string& OurFile() {
  static const std::string* file =
      new std::string(absl::GetFlagReflectionHandle(FLAGS_address).Filename());
  return *file;
}

bool IsOurs(const absl::CommandLineFlag& flag) {
  return flag.Filename() == OurFile();
}

// Flags by name, of file `ours` (true) or of every other file.
std::vector<const absl::CommandLineFlag*> SortedFlags(bool ours) {
  std::vector<const absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!flag->IsRetired() && IsOurs(*flag) == ours) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(), [](const auto* a, const auto* b) {
    return std::make_pair(a->Filename(), a->Name()) <
           std::make_pair(b->Filename(), b->Name());
  });
  return flags;
}

// "  --name   help (default: ...)", wrapped; the default is never split.
std::string FlagUsage(const absl::CommandLineFlag& flag) {
  std::string out = absl::StrCat("  --", flag.Name());
  size_t column = out.size();
  if (column + 2 > kHelpColumn) {
    out += "\n";
    column = 0;
  }
  const std::string default_value = flag.DefaultValue();
  std::vector<std::string> words =
      absl::StrSplit(flag.Help(), ' ', absl::SkipEmpty());
  words.push_back(absl::StrCat(
      "(default: ", default_value.empty() ? "none" : default_value, ")"));
  bool line_start = true;
  for (const std::string& word : words) {
    if (!line_start && column + 1 + word.size() > kWidth) {
      out += "\n";
      column = 0;
      line_start = true;
    }
    if (line_start) {
      out.append(kHelpColumn - column, ' ');
      column = kHelpColumn;
    } else {
      out += ' ';
      ++column;
    }
    out += word;
    column += word.size();
    line_start = false;
  }
  return out + "\n";
}

std::string Usage(bool full) {
  std::string out = kUsageHead;
  for (const absl::CommandLineFlag* flag : SortedFlags(true)) {
    out += FlagUsage(*flag);
  }
  out += kUsageTail;
  if (full) {
    std::string file;
    for (const absl::CommandLineFlag* flag : SortedFlags(false)) {
      if (flag->Filename() != file) {
        file = flag->Filename();
        absl::StrAppend(&out, "\nflags from ", file, " (not settable):\n");
      }
      out += FlagUsage(*flag);
    }
  }
  return out;
}

// Why ParseFrom refused `value`: our AbslParseFlag's message without absl's
// "Illegal value 'V' specified for flag 'NAME'; " (all of absl's message if
// it does not read so).
std::string ParseError(const absl::CommandLineFlag& flag,
                       absl::string_view value, absl::string_view error) {
  absl::string_view reason = error;
  if (absl::ConsumePrefix(&reason, absl::StrCat("Illegal value '", value,
                                                "' specified for flag '",
                                                flag.Name(), "'; "))) {
    return std::string(reason);
  }
  return std::string(error);
}

}  // namespace

void ParseFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h" || arg == "--helpfull") {
      std::fputs(Usage(arg == "--helpfull").c_str(), stdout);
      std::exit(0);
    }
    if (arg == "--version") {
      std::printf("normserve %s\n", kVersion);
      std::exit(0);
    }
    absl::string_view name = arg;
    absl::CommandLineFlag* flag = nullptr;
    const bool dashes = absl::ConsumePrefix(&name, "--");
    const size_t equals = name.find('=');
    if (dashes) flag = absl::FindCommandLineFlag(name.substr(0, equals));
    if (flag == nullptr || !IsOurs(*flag)) {
      Fail(absl::StrCat("unknown flag ", arg, " (see --help)"));
    }
    std::string value;
    if (equals != absl::string_view::npos) {
      value = std::string(name.substr(equals + 1));
    } else if (flag->IsOfType<bool>()) {
      value = "true";
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      Fail(absl::StrCat("--", flag->Name(), " needs a value"));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      Fail(absl::StrCat("--", flag->Name(), " ", value, ": ",
                        ParseError(*flag, value, error)));
    }
  }
}

ServerOptions ServerOptionsFromFlags() {
  const auto mib = [](const auto& flag) {
    return static_cast<size_t>(absl::GetFlag(flag).value) << 20;
  };
  const auto count = [](const auto& flag) {
    return static_cast<size_t>(absl::GetFlag(flag).value);
  };
  const auto as_int = [](const auto& flag) {
    return static_cast<int>(absl::GetFlag(flag).value);
  };
  ServerOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.health_address = absl::GetFlag(FLAGS_health_address);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.device = absl::GetFlag(FLAGS_device);
  options.cpu_threads = as_int(FLAGS_cpu_threads);
  options.max_message_bytes = mib(FLAGS_max_message_mb);
  options.max_streams = count(FLAGS_max_streams);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.auth_tokens_file = absl::GetFlag(FLAGS_auth_tokens);
  options.engine.num_workers = as_int(FLAGS_workers);
  options.engine.max_saved_bytes = mib(FLAGS_max_saved_mb);
  options.engine.max_saved_contexts = count(FLAGS_max_saved_contexts);
  options.engine.max_layers = count(FLAGS_max_layers);
  options.engine.max_layers_per_tenant = count(FLAGS_max_layers_per_tenant);
  options.engine.max_state_bytes = mib(FLAGS_max_state_mb);
  options.journal.dir = absl::GetFlag(FLAGS_state_dir);
  options.journal.fsync = absl::GetFlag(FLAGS_fsync);
  options.journal.fsync_interval_ms = as_int(FLAGS_fsync_interval_ms);
  options.journal.snapshot_every = absl::GetFlag(FLAGS_snapshot_every).value;
  return options;
}

absl::Duration ShutdownGraceFromFlags() {
  return absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_s).value);
}

}  // namespace normserve::server
