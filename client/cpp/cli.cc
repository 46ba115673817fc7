// normserve-cli: manage and exercise layers on a normserve server.
// Run `normserve-cli --help` for usage.

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cpp/cli_args.h"
#include "client/cpp/client.h"
#include "client/cpp/state_json.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"
#include "common/version.h"
#include "google/protobuf/text_format.h"

namespace normserve::client::cli {
namespace {

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(
      std::fopen(path.c_str(), "rb"), &std::fclose);
  if (file == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  std::string data;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file.get())) > 0) {
    data.append(buffer, n);
  }
  if (std::ferror(file.get())) {
    return absl::DataLossError(absl::StrCat("error reading ", path));
  }
  return data;
}

absl::Status WriteFile(const std::string& path, absl::string_view data) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  }
  const bool written =
      std::fwrite(data.data(), 1, data.size(), file) == data.size();
  if (std::fclose(file) != 0 || !written) {
    return absl::DataLossError(absl::StrCat("error writing ", path));
  }
  return absl::OkStatus();
}

// Returns `count` standard normal values from a fixed-algorithm generator
// (mt19937_64 and Box-Muller), so a seed gives the same input everywhere.
std::vector<float> RandomNormal(size_t count, uint64_t seed) {
  std::mt19937_64 engine(seed);
  auto uniform = [&engine] {
    // 53 random bits in (0, 1].
    return (static_cast<double>(engine() >> 11) + 1.0) * 0x1.0p-53;
  };
  std::vector<float> values(count);
  for (size_t i = 0; i < count; i += 2) {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    const double angle = 2.0 * M_PI * uniform();
    values[i] = static_cast<float>(radius * std::cos(angle));
    if (i + 1 < count)
      values[i + 1] = static_cast<float>(radius * std::sin(angle));
  }
  return values;
}

uint64_t Fnv1a64(absl::string_view bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char byte : bytes) {
    hash ^= byte;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string LayerSummary(const v1::Layer& layer) {
  auto shape = [](const auto& dims) {
    return absl::StrCat("[", absl::StrJoin(dims, ","), "]");
  };
  switch (layer.config_case()) {
    case v1::Layer::kLayerNorm:
      return absl::StrFormat(
          "%s  layer_norm normalized_shape=%s dtype=%s device=%s version=%d",
          layer.name(), shape(layer.layer_norm().normalized_shape()),
          DTypeName(layer.layer_norm().dtype()), layer.layer_norm().device(),
          layer.version());
    case v1::Layer::kRmsNorm:
      return absl::StrFormat(
          "%s  rms_norm normalized_shape=%s dtype=%s device=%s version=%d",
          layer.name(), shape(layer.rms_norm().normalized_shape()),
          DTypeName(layer.rms_norm().dtype()), layer.rms_norm().device(),
          layer.version());
    case v1::Layer::kGroupNorm:
      return absl::StrFormat(
          "%s  group_norm num_groups=%d num_channels=%d affine=%s dtype=%s "
          "device=%s version=%d",
          layer.name(), layer.group_norm().num_groups(),
          layer.group_norm().num_channels(),
          layer.group_norm().affine() ? "true" : "false",
          DTypeName(layer.group_norm().dtype()), layer.group_norm().device(),
          layer.version());
    case v1::Layer::kInstanceNorm: {
      const v1::InstanceNormConfig& c = layer.instance_norm();
      return absl::StrFormat(
          "%s  instance_norm num_features=%d affine=%s "
          "track_running_stats=%s dtype=%s layout=%s device=%s version=%d",
          layer.name(), c.num_features(), c.affine() ? "true" : "false",
          c.track_running_stats() ? "true" : "false", DTypeName(c.dtype()),
          v1::Layout_Name(c.layout()), c.device(), layer.version());
    }
    case v1::Layer::kSyncBatchNorm: {
      const v1::SyncBatchNormConfig& c = layer.sync_batch_norm();
      return absl::StrFormat(
          "%s  sync_batch_norm num_features=%d world_size=%d "
          "barrier_timeout_ms=%d dtype=%s device=%s version=%d "
          "num_batches_tracked=%d",
          layer.name(), c.batch_norm().num_features(), c.world_size(),
          c.barrier_timeout_ms(), DTypeName(c.batch_norm().dtype()),
          c.batch_norm().device(), layer.version(),
          layer.num_batches_tracked());
    }
    default:
      break;
  }
  const v1::BatchNormConfig& config = layer.batch_norm();
  return absl::StrFormat(
      "%s  num_features=%d dtype=%s layout=%s device=%s version=%d "
      "num_batches_tracked=%d",
      layer.name(), config.num_features(), DTypeName(config.dtype()),
      v1::Layout_Name(config.layout()), config.device(), layer.version(),
      layer.num_batches_tracked());
}

void PrintLayer(const v1::Layer& layer) {
  std::string text;
  google::protobuf::TextFormat::PrintToString(layer, &text);
  std::fputs(text.c_str(), stdout);
}

absl::Status RunCreate(Client& client, const CommandLine& line) {
  ASSIGN_OR_RETURN(v1::CreateLayerRequest request,
                   CreateRequestFromFlags(line));
  ASSIGN_OR_RETURN(MutationOptions options, MutationOptionsFromFlags(line));
  ASSIGN_OR_RETURN(v1::Layer layer, client.CreateLayer(request, options));
  PrintLayer(layer);
  return absl::OkStatus();
}

absl::Status RunList(Client& client) {
  ASSIGN_OR_RETURN(std::vector<v1::Layer> layers, client.ListAllLayers());
  for (const v1::Layer& layer : layers) {
    std::printf("%s\n", LayerSummary(layer).c_str());
  }
  std::printf("%zu layer(s)\n", layers.size());
  return absl::OkStatus();
}

absl::Status RunGet(Client& client, const CommandLine& line) {
  ASSIGN_OR_RETURN(v1::Layer layer, client.GetLayer(line.positional[0]));
  PrintLayer(layer);
  return absl::OkStatus();
}

absl::Status RunDelete(Client& client, const CommandLine& line) {
  ASSIGN_OR_RETURN(MutationOptions options, MutationOptionsFromFlags(line));
  RETURN_IF_ERROR(client.DeleteLayer(line.positional[0], options));
  std::printf("deleted %s\n", line.positional[0].c_str());
  return absl::OkStatus();
}

absl::Status RunForward(Client& client, const CommandLine& line) {
  ASSIGN_OR_RETURN(ForwardArgs args, ForwardArgsFromFlags(line));
  ASSIGN_OR_RETURN(int64_t count, NumElements(args.shape));
  std::vector<float> input;
  if (args.input_path.empty()) {
    input = RandomNormal(static_cast<size_t>(count), args.seed);
  } else {
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(args.input_path));
    if (bytes.size() != static_cast<uint64_t>(count) * sizeof(float)) {
      return absl::InvalidArgumentError(
          absl::StrCat(args.input_path, " has ", bytes.size(), " bytes; shape ",
                       ShapeString(args.shape), " needs ",
                       count * sizeof(float), " (raw float32)"));
    }
    input.resize(static_cast<size_t>(count));
    std::memcpy(input.data(), bytes.data(), bytes.size());
  }

  v1::ForwardRequest request;
  request.set_name(args.name);
  ASSIGN_OR_RETURN(*request.mutable_input(),
                   MakeTensor(input, args.shape, args.dtype, args.layout));
  request.set_training(args.training);
  // Nothing will call Backward: let the server keep no context.
  request.set_save_for_backward(false);
  ASSIGN_OR_RETURN(MutationOptions options, MutationOptionsFromFlags(line));
  ASSIGN_OR_RETURN(v1::ForwardResponse response,
                   client.Forward(request, options));
  const v1::Tensor& output = response.output();
  ASSIGN_OR_RETURN(std::vector<float> values, TensorToFloats(output));

  double sum = 0;
  for (float v : values) sum += v;
  const double mean = values.empty() ? 0 : sum / values.size();
  double squares = 0;
  for (float v : values) squares += (v - mean) * (v - mean);
  const double stddev = values.empty() ? 0 : std::sqrt(squares / values.size());
  std::printf("layer: %s  mode: %s  version: %lld\n", args.name.c_str(),
              args.training ? "training" : "eval",
              static_cast<long long>(response.version()));
  std::printf("output: shape=%s dtype=%s layout=%s\n",
              ShapeString(output.shape()).c_str(),
              DTypeName(output.dtype()).c_str(),
              v1::Layout_Name(output.layout()).c_str());
  std::printf("mean=%.6f std=%.6f sum=%.6f\n", mean, stddev, sum);
  std::printf("checksum: fnv1a64=%016llx\n",
              static_cast<unsigned long long>(Fnv1a64(output.data())));
  if (!args.output_path.empty()) {
    RETURN_IF_ERROR(WriteFile(
        args.output_path,
        absl::string_view(reinterpret_cast<const char*>(values.data()),
                          values.size() * sizeof(float))));
    std::printf("wrote %zu float32 values to %s\n", values.size(),
                args.output_path.c_str());
  }
  return absl::OkStatus();
}

absl::Status RunState(Client& client, const CommandLine& line) {
  // ParseCommandLine made sure --output is there.
  const std::string& output = line.flags.at("output");
  ASSIGN_OR_RETURN(v1::GetStateResponse response,
                   client.GetState(line.positional[0]));
  // The state carries no layer name: use the one given, as "layers/{id}".
  const std::string& name = line.positional[0];
  ASSIGN_OR_RETURN(std::string json,
                   StateDictToJson(absl::StartsWith(name, "layers/")
                                       ? name
                                       : absl::StrCat("layers/", name),
                                   response.version(), response.state()));
  RETURN_IF_ERROR(WriteFile(output, json));
  std::printf("wrote %d tensors (version %lld) to %s\n",
              response.state().tensors_size(),
              static_cast<long long>(response.version()), output.c_str());
  return absl::OkStatus();
}

absl::Status RunHealth(Client& client, const CommandLine& line) {
  auto service = line.flags.find("service");
  const std::string name = service == line.flags.end() ? "" : service->second;
  ASSIGN_OR_RETURN(HealthStatus status, client.CheckHealth(name));
  if (status != HealthStatus::kServing) {
    return absl::UnavailableError(
        absl::StrCat("server reports ", HealthStatusName(status)));
  }
  std::printf("%s\n", HealthStatusName(status));
  return absl::OkStatus();
}

absl::Status RunCommand(Client& client, const CommandLine& line) {
  const std::string& command = line.command;
  if (command == "create") return RunCreate(client, line);
  if (command == "list") return RunList(client);
  if (command == "get") return RunGet(client, line);
  if (command == "delete") return RunDelete(client, line);
  if (command == "forward") return RunForward(client, line);
  if (command == "state") return RunState(client, line);
  if (command == "health") return RunHealth(client, line);
  return absl::InternalError(absl::StrCat("unhandled command ", command));
}

int PrintError(const absl::Status& status, int exit_code) {
  std::fprintf(stderr, "error: %s: %s\n",
               absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  if (exit_code == kExitUsage) {
    std::fprintf(stderr, "run 'normserve-cli --help' for usage\n");
  }
  return exit_code;
}

int Main(int argc, char** argv) {
  absl::StatusOr<CommandLine> line =
      ParseCommandLine(std::vector<std::string>(argv + 1, argv + argc));
  if (!line.ok()) return PrintError(line.status(), kExitUsage);
  if (line->help) {
    std::fputs(UsageText(), stdout);
    return 0;
  }
  if (line->version) {
    std::printf("normserve-cli %s\n", kVersion);
    return 0;
  }
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags(*line);
  if (!options.ok()) return PrintError(options.status(), kExitUsage);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(*options);
  if (!client.ok()) return PrintError(client.status(), kExitUsage);
  absl::Status status = RunCommand(**client, *line);
  if (!status.ok()) return PrintError(status, kExitError);
  return 0;
}

}  // namespace
}  // namespace normserve::client::cli

int main(int argc, char** argv) {
  return normserve::client::cli::Main(argc, argv);
}
