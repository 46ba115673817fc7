// normserve-rpc-bench: service overhead. For each payload size, measures
// one call at a time (closed loop) of
//   echo_unary      Echo.Echo on normserve-echo-server (same bytes back)
//   echo_stream     Echo.EchoStream, one message out, one back
//   forward_unary   Normalization.Forward (training, nothing saved)
//   forward_stream  the same Forward as a message of a Train stream
// and prints / writes latency (p50, mean, min) and one-way throughput
// (payload bytes / mean latency). Modes are interleaved in rounds so that
// drift of a shared machine hits them alike.
//
// Forward's input is (N, 64, 8, 8) float32 when the payload is a multiple of
// 16 KiB (16 KiB is the batch-1 case (1, 64, 8, 8)), else (1, 64, L).
// Requests and responses are reused across calls unless --fresh_responses.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/echo.grpc.pb.h"
#include "bench/load/load_report.h"
#include "bench/load/load_stats.h"
#include "normserve/v1/normserve.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = normserve::v1;
using normserve::bench::EchoMessage;

constexpr const char* kModes[] = {"echo_unary", "forward_unary", "echo_stream",
                                  "forward_stream"};

struct Options {
  std::string echo_address;
  std::string normserve_address;
  std::vector<int64_t> sizes = {1 << 10,   4 << 10,  16 << 10, 64 << 10,
                                256 << 10, 1 << 20,  4 << 20,  16 << 20,
                                64 << 20,  256 << 20};
  std::vector<std::string> modes = {std::begin(kModes), std::end(kModes)};
  double min_time_s = 0.6;
  int rounds = 3;
  int min_calls = 3;
  int max_calls = 5000;
  bool fresh_responses = false;
  std::string label;
  std::string json_path;
};

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "normserve-rpc-bench: %s\n", message.c_str());
  std::exit(1);
}

int64_t ParseSize(absl::string_view s) {
  int64_t scale = 1;
  if (!s.empty() && (s.back() == 'K' || s.back() == 'k')) scale = 1 << 10;
  if (!s.empty() && (s.back() == 'M' || s.back() == 'm')) scale = 1 << 20;
  if (scale != 1) s.remove_suffix(1);
  int64_t v = 0;
  if (!absl::SimpleAtoi(s, &v) || v * scale < 4 || (v * scale) % 4 != 0) {
    Die(absl::StrCat("bad size '", s,
                     "': expected bytes (a multiple of 4), "
                     "optionally with K or M"));
  }
  return v * scale;
}

std::vector<int64_t> InputShape(int64_t bytes) {
  const int64_t elements = bytes / 4;
  if (bytes % (16 << 10) == 0) return {elements / 4096, 64, 8, 8};
  if (elements % 64 == 0 && elements / 64 >= 2) return {1, 64, elements / 64};
  Die(absl::StrCat("size ", bytes, " does not fit a (1, 64, L) input"));
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) {
  grpc::ChannelArguments args;
  // One message carries a whole tensor.
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Each benchmark channel gets its own TCP connection.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                   args);
}

std::chrono::system_clock::time_point Deadline() {
  return std::chrono::system_clock::now() + std::chrono::minutes(5);
}

class Bench {
 public:
  explicit Bench(const Options& options) : options_(options) {
    echo_ = normserve::bench::Echo::NewStub(MakeChannel(options.echo_address));
    norm_ = v1::Normalization::NewStub(MakeChannel(options.normserve_address));
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::CreateLayerRequest create;
    create.set_layer_id(
        absl::StrFormat("rpc-bench-%x", static_cast<unsigned>(getpid())));
    create.mutable_batch_norm()->set_num_features(64);
    v1::Layer layer;
    grpc::Status status = norm_->CreateLayer(&context, create, &layer);
    if (!status.ok()) {
      Die(absl::StrCat("CreateLayer on ", options.normserve_address, ": ",
                       status.error_message()));
    }
    layer_ = layer.name();
    echo_stream_context_.set_deadline(Deadline() + std::chrono::hours(1));
    echo_stream_ = echo_->EchoStream(&echo_stream_context_);
    train_context_.set_deadline(Deadline() + std::chrono::hours(1));
    train_stream_ = norm_->Train(&train_context_);
  }

  ~Bench() {
    echo_stream_->WritesDone();
    echo_stream_->Finish().ok();
    train_stream_->WritesDone();
    train_stream_->Finish().ok();
    grpc::ClientContext context;
    v1::DeleteLayerRequest request;
    request.set_name(layer_);
    v1::DeleteLayerResponse response;
    norm_->DeleteLayer(&context, request, &response).ok();
  }

  // Prepares the requests for one payload size.
  void SetSize(int64_t bytes) {
    bytes_ = bytes;
    std::mt19937 rng(static_cast<uint32_t>(bytes));
    std::normal_distribution<float> normal;
    std::string data(bytes, '\0');
    for (int64_t i = 0; i < bytes / 4; ++i) {
      const float v = normal(rng);
      std::memcpy(&data[i * 4], &v, 4);
    }
    echo_request_.set_payload(data);
    v1::ForwardRequest* f = train_request_.mutable_forward();
    f->set_name(layer_);
    f->set_training(true);
    f->set_save_for_backward(false);
    v1::Tensor* t = f->mutable_input();
    t->clear_shape();
    for (int64_t d : InputShape(bytes)) t->add_shape(d);
    t->set_dtype(v1::DTYPE_FLOAT32);
    t->set_layout(v1::LAYOUT_NCHW);
    t->set_data(std::move(data));
    forward_request_ = *f;
  }

  // Runs one call of `mode`; returns its latency in seconds.
  double Call(const std::string& mode) {
    const auto start = Clock::now();
    grpc::Status status;
    bool ok = true;
    int64_t received = 0;
    if (mode == "echo_unary") {
      grpc::ClientContext context;
      context.set_deadline(Deadline());
      if (options_.fresh_responses) {
        EchoMessage response;
        status = echo_->Echo(&context, echo_request_, &response);
        received = static_cast<int64_t>(response.payload().size());
      } else {
        echo_response_.Clear();
        status = echo_->Echo(&context, echo_request_, &echo_response_);
        received = static_cast<int64_t>(echo_response_.payload().size());
      }
    } else if (mode == "forward_unary") {
      grpc::ClientContext context;
      context.set_deadline(Deadline());
      if (options_.fresh_responses) {
        v1::ForwardResponse response;
        status = norm_->Forward(&context, forward_request_, &response);
        received = static_cast<int64_t>(response.output().data().size());
      } else {
        forward_response_.Clear();
        status = norm_->Forward(&context, forward_request_, &forward_response_);
        received =
            static_cast<int64_t>(forward_response_.output().data().size());
      }
    } else if (mode == "echo_stream") {
      EchoMessage fresh;
      EchoMessage* response =
          options_.fresh_responses ? &fresh : &echo_response_;
      ok = echo_stream_->Write(echo_request_) && echo_stream_->Read(response);
      received = static_cast<int64_t>(response->payload().size());
    } else {
      v1::TrainResponse fresh;
      v1::TrainResponse* response =
          options_.fresh_responses ? &fresh : &train_response_;
      train_request_.set_request_id(train_request_.request_id() + 1);
      ok =
          train_stream_->Write(train_request_) && train_stream_->Read(response);
      if (ok && response->status().code() != 0) {
        Die(absl::StrCat("Forward on the Train stream: ",
                         response->status().message()));
      }
      received =
          static_cast<int64_t>(response->forward().output().data().size());
    }
    const double seconds =
        std::chrono::duration<double>(Clock::now() - start).count();
    if (!status.ok() || !ok) {
      Die(absl::StrCat(mode, " with ", bytes_,
                       " bytes failed: ", status.error_message()));
    }
    if (received != bytes_) {
      Die(absl::StrCat(mode, " answered ", received, " bytes, expected ",
                       bytes_));
    }
    return seconds;
  }

 private:
  const Options& options_;
  std::unique_ptr<normserve::bench::Echo::Stub> echo_;
  std::unique_ptr<v1::Normalization::Stub> norm_;
  std::string layer_;
  int64_t bytes_ = 0;
  EchoMessage echo_request_, echo_response_;
  v1::ForwardRequest forward_request_;
  v1::ForwardResponse forward_response_;
  v1::TrainRequest train_request_;
  v1::TrainResponse train_response_;
  grpc::ClientContext echo_stream_context_, train_context_;
  std::unique_ptr<grpc::ClientReaderWriter<EchoMessage, EchoMessage>>
      echo_stream_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::TrainRequest, v1::TrainResponse>>
      train_stream_;
};

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name, std::string* out) {
      const std::string flag = absl::StrCat("--", name);
      if (arg == flag && i + 1 < argc) {
        *out = argv[++i];
        return true;
      }
      if (arg.rfind(flag + "=", 0) == 0) {
        *out = arg.substr(flag.size() + 1);
        return true;
      }
      return false;
    };
    std::string v;
    if (value("echo", &v)) {
      options.echo_address = v;
    } else if (value("normserve", &v)) {
      options.normserve_address = v;
    } else if (value("sizes", &v)) {
      options.sizes.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) {
        options.sizes.push_back(ParseSize(s));
      }
    } else if (value("modes", &v)) {
      options.modes = absl::StrSplit(v, ',');
      for (const std::string& m : options.modes) {
        if (std::find(std::begin(kModes), std::end(kModes), m) ==
            std::end(kModes)) {
          Die(absl::StrCat("unknown mode ", m));
        }
      }
    } else if (value("min_time_s", &v)) {
      if (!absl::SimpleAtod(v, &options.min_time_s)) Die("bad --min_time_s");
    } else if (value("rounds", &v)) {
      if (!absl::SimpleAtoi(v, &options.rounds) || options.rounds < 1) {
        Die("bad --rounds");
      }
    } else if (value("min_calls", &v)) {
      if (!absl::SimpleAtoi(v, &options.min_calls)) Die("bad --min_calls");
    } else if (value("max_calls", &v)) {
      if (!absl::SimpleAtoi(v, &options.max_calls)) Die("bad --max_calls");
    } else if (value("label", &v)) {
      options.label = v;
    } else if (value("json", &v)) {
      options.json_path = v;
    } else if (arg == "--fresh_responses") {
      options.fresh_responses = true;
    } else {
      std::fprintf(
          stderr,
          "usage: normserve-rpc-bench --echo HOST:PORT --normserve HOST:PORT\n"
          "  [--sizes 1K,16K,1M,...] [--modes echo_unary,forward_unary,"
          "echo_stream,forward_stream]\n"
          "  [--min_time_s S] [--rounds N] [--min_calls N] [--max_calls N]\n"
          "  [--fresh_responses] [--label TEXT] [--json FILE]\n");
      return 2;
    }
  }
  if (options.echo_address.empty() || options.normserve_address.empty()) {
    Die("--echo and --normserve are required");
  }

  Bench bench(options);
  std::vector<std::string> size_json;
  std::printf("%10s %-15s %6s %10s %10s %10s %10s\n", "bytes", "mode", "calls",
              "p50 ms", "mean ms", "min ms", "MB/s");
  for (int64_t bytes : options.sizes) {
    bench.SetSize(bytes);
    std::map<std::string, std::vector<double>> times;
    for (const std::string& mode : options.modes) bench.Call(mode);  // Warm.
    const double budget = options.min_time_s / options.rounds;
    for (int round = 0; round < options.rounds; ++round) {
      for (const std::string& mode : options.modes) {
        std::vector<double>& t = times[mode];
        const int min_calls =
            (options.min_calls + options.rounds - 1) / options.rounds;
        double spent = 0;
        for (int n = 0; (spent < budget || n < min_calls) &&
                        static_cast<int>(t.size()) < options.max_calls;
             ++n) {
          t.push_back(bench.Call(mode));
          spent += t.back();
        }
      }
    }
    std::vector<std::string> mode_json;
    for (const std::string& mode : options.modes) {
      std::vector<double> ms;
      for (double s : times[mode]) ms.push_back(s * 1e3);
      const normserve::load::LatencySummary l = normserve::load::Summarize(ms);
      const double mb_per_s = bytes / 1e6 / (l.mean / 1e3);
      std::printf("%10lld %-15s %6lld %10.3f %10.3f %10.3f %10.1f\n",
                  static_cast<long long>(bytes), mode.c_str(),
                  static_cast<long long>(l.count), l.p50, l.mean, l.min,
                  mb_per_s);
      std::fflush(stdout);
      mode_json.push_back(absl::StrCat(
          "\"", mode, "\": {\"calls\": ", l.count,
          ", \"p50_ms\": ", normserve::load::JsonNumber(l.p50),
          ", \"p90_ms\": ", normserve::load::JsonNumber(l.p90),
          ", \"mean_ms\": ", normserve::load::JsonNumber(l.mean),
          ", \"min_ms\": ", normserve::load::JsonNumber(l.min),
          ", \"mb_per_s\": ", normserve::load::JsonNumber(mb_per_s), "}"));
    }
    size_json.push_back(absl::StrCat(
        "    {\"bytes\": ", bytes, ", \"input_shape\": [",
        absl::StrJoin(InputShape(bytes), ", "), "],\n     \"modes\": {",
        absl::StrJoin(mode_json, ",\n               "), "}}"));
  }
  if (!options.json_path.empty()) {
    std::ofstream out(options.json_path);
    out << "{\"label\": " << normserve::load::JsonString(options.label)
        << ", \"fresh_responses\": "
        << (options.fresh_responses ? "true" : "false")
        << ", \"rounds\": " << options.rounds
        << ", \"min_time_s\": " << options.min_time_s << ",\n  \"sizes\": [\n"
        << absl::StrJoin(size_json, ",\n") << "\n  ]}\n";
    if (!out) Die(absl::StrCat("cannot write ", options.json_path));
  }
  return 0;
}
