// libFuzzer target over the front end's request handling: the first byte
// picks a call, the rest is parsed as its request message and, when it
// parses, run through Operations against a CPU engine holding one layer
// ("bn", 3 features), exactly as the gRPC handlers do (minus the transport).
// Every call must finish (its `done` runs) with some status; crashes,
// sanitizer reports, leaks and hangs are failures.
//
// Built with clang by scripts/fuzz.sh (-fsanitize=fuzzer,address,undefined);
// the seed corpus is tests/fuzz/corpus (scripts/fuzz.sh --make-seeds
// regenerates it). Without libFuzzer (NORMSERVE_FUZZ_STANDALONE) main()
// replays the files named on the command line.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string>

#include "normserve/v1/normserve.pb.h"
#include "server/core/device.h"
#include "server/core/engine.h"
#include "server/grpc/operations.h"

namespace normserve::server {
namespace {

struct World {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Operations> ops;
};

World* GetWorld() {
  static World* world = [] {
    auto* w = new World();
    EngineOptions options;
    options.num_workers = 1;
    options.max_tensor_bytes = 1 << 16;  // Keep each input fast.
    options.max_saved_contexts = 16;
    options.max_saved_bytes = 1 << 20;
    options.max_layers = 8;
    // Layers up to 2^27 features are valid; allocating and zeroing one
    // (2 GiB) takes seconds and most of the RSS limit, and the fuzzer would
    // spend its runs there. 1 MiB of state still takes every path.
    options.max_state_bytes = 1 << 20;
    w->engine = *Engine::Create(options, *CreateBackend("cpu", 1));
    w->ops = std::make_unique<Operations>(w->engine.get());
    return w;
  }();
  return world;
}

// Runs `call(done)` and waits for its done; returns its status.
template <typename Call>
absl::Status Run(Call call) {
  auto promise = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = promise->get_future();
  call([promise](absl::Status status) { promise->set_value(status); });
  return result.get();
}

template <typename Request>
bool Parse(const uint8_t* data, size_t size, Request* request) {
  return request->ParseFromArray(data, static_cast<int>(size));
}

void EnsureLayer(World* w) {
  pb::GetLayerRequest get;
  get.set_name("bn");
  pb::Layer layer;
  if (!w->ops->GetLayer(get, &layer).ok()) {
    pb::CreateLayerRequest create;
    create.set_layer_id("bn");
    create.mutable_batch_norm()->set_num_features(3);
    Run([&](Operations::Done done) {
      w->ops->CreateLayer(create, &layer, done);
    }).IgnoreError();
  }
  // A sync group whose steps never wait long: one rank (until an input
  // changes its world_size) and a 1 ms barrier.
  get.set_name("sg");
  if (!w->ops->GetLayer(get, &layer).ok()) {
    pb::CreateLayerRequest create;
    create.set_layer_id("sg");
    pb::SyncBatchNormConfig* sync = create.mutable_sync_batch_norm();
    sync->mutable_batch_norm()->set_num_features(3);
    sync->set_world_size(1);
    sync->set_barrier_timeout_ms(1);
    Run([&](Operations::Done done) {
      w->ops->CreateLayer(create, &layer, done);
    }).IgnoreError();
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  if (size < 1) return;
  World* w = GetWorld();
  EnsureLayer(w);
  Operations& ops = *w->ops;
  const uint8_t selector = data[0] % 15;
  ++data;
  --size;
  switch (selector) {
    case 0: {
      pb::CreateLayerRequest request;
      pb::Layer response;
      if (!Parse(data, size, &request)) return;
      if (Run([&](Operations::Done done) {
            ops.CreateLayer(request, &response, done);
          }).ok()) {
        // Keep the registry small: drop what the input made.
        pb::DeleteLayerRequest del;
        del.set_name(response.name());
        if (response.name() != "layers/bn") {
          Run([&](Operations::Done done) {
            ops.DeleteLayer(del, done);
          }).IgnoreError();
        }
      }
      return;
    }
    case 1: {
      pb::GetLayerRequest request;
      pb::Layer response;
      if (Parse(data, size, &request))
        ops.GetLayer(request, &response).IgnoreError();
      return;
    }
    case 2: {
      pb::ListLayersRequest request;
      pb::ListLayersResponse response;
      if (Parse(data, size, &request)) {
        ops.ListLayers(request, &response).IgnoreError();
      }
      return;
    }
    case 3: {
      pb::DeleteLayerRequest request;
      if (Parse(data, size, &request)) {
        Run([&](Operations::Done done) {
          ops.DeleteLayer(request, done);
        }).IgnoreError();
      }
      return;
    }
    case 4: {
      pb::ForwardRequest request;
      pb::ForwardResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.Forward(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 5: {
      pb::BackwardRequest request;
      pb::BackwardResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.Backward(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 6: {
      pb::UpdateRunningStatsRequest request;
      pb::UpdateRunningStatsResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.UpdateRunningStats(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 7: {
      pb::OptimizerStepRequest request;
      pb::OptimizerStepResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.OptimizerStep(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 8: {
      pb::SetParametersRequest request;
      pb::SetParametersResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.SetParameters(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 9: {
      pb::GetStateRequest request;
      pb::GetStateResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.GetState(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 10: {
      pb::LoadStateRequest request;
      pb::LoadStateResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.LoadState(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 11: {
      pb::TrainRequest request;
      pb::TrainResponse response;
      if (!Parse(data, size, &request)) return;
      Run([&](Operations::Done done) {
        ops.Dispatch(request, &response, done);
      }).IgnoreError();
      return;
    }
    // The sync group: stats or tensor mode, and its world_size.
    case 12: {
      pb::SyncForwardRequest request;
      pb::SyncForwardResponse response;
      if (!Parse(data, size, &request)) return;
      request.set_name("sg");
      Run([&](Operations::Done done) {
        ops.SyncForward(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 13: {
      pb::SyncBackwardRequest request;
      pb::SyncBackwardResponse response;
      if (!Parse(data, size, &request)) return;
      request.set_name("sg");
      Run([&](Operations::Done done) {
        ops.SyncBackward(request, &response, done);
      }).IgnoreError();
      return;
    }
    case 14: {
      pb::SetWorldSizeRequest request;
      pb::SetWorldSizeResponse response;
      if (!Parse(data, size, &request)) return;
      request.set_name("sg");
      Run([&](Operations::Done done) {
        ops.SetWorldSize(request, &response, done);
      }).IgnoreError();
      // Back to one rank, so that later steps never wait for others.
      request.Clear();
      request.set_name("sg");
      request.set_world_size(1);
      Run([&](Operations::Done done) {
        ops.SetWorldSize(request, &response, done);
      }).IgnoreError();
      return;
    }
  }
}

}  // namespace
}  // namespace normserve::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  normserve::server::FuzzOne(data, size);
  return 0;
}

#ifdef NORMSERVE_FUZZ_STANDALONE
// Replays each file named on the command line once.
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    const std::string bytes = text.str();
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()),
                           bytes.size());
  }
  std::printf("replayed %d inputs\n", argc - 1);
  return 0;
}
#endif
