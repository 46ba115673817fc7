// normserve-sync-rank: one C++ rank of a sync group, for the
// heterogeneous-clients test (test_hetero.py). Joins GROUP as RANK with
// RemoteSyncBatchNorm, then for each of STEPS steps reads x and dy (float32,
// shape N x C x S each, one after the other) from INPUT, runs a training
// Forward and Backward, and appends y, grad_input and grad_weight (float32)
// to OUTPUT. MODE is stats (the default) or tensor.
//
// usage: normserve-sync-rank ADDRESS GROUP RANK WORLD_SIZE C N S STEPS INPUT
//                            OUTPUT [MODE]
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "client/cpp/client.h"
#include "client/cpp/remote_sync_batch_norm.h"

namespace nc = normserve::client;

int main(int argc, char** argv) {
  const std::string mode = argc == 12 ? argv[11] : "stats";
  if ((argc != 11 && argc != 12) || (mode != "stats" && mode != "tensor")) {
    std::fprintf(stderr,
                 "usage: %s ADDRESS GROUP RANK WORLD_SIZE C N S STEPS INPUT "
                 "OUTPUT [stats|tensor]\n",
                 argv[0]);
    return 2;
  }
  const int rank = std::atoi(argv[3]), world = std::atoi(argv[4]);
  const int64_t c = std::atoll(argv[5]), n = std::atoll(argv[6]),
                s = std::atoll(argv[7]);
  const int steps = std::atoi(argv[8]);
  nc::ClientOptions options;
  options.target = argv[1];
  auto client = nc::Client::Create(options);
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    return 1;
  }
  normserve::v1::SyncBatchNormConfig config;
  config.mutable_batch_norm()->set_num_features(c);
  config.set_world_size(world);
  auto bn = nc::RemoteSyncBatchNorm::Join(
      **client, config, argv[2], rank,
      mode == "tensor" ? nc::RemoteSyncBatchNorm::Mode::kTensor
                       : nc::RemoteSyncBatchNorm::Mode::kStats);
  if (!bn.ok()) {
    std::fprintf(stderr, "%s\n", bn.status().ToString().c_str());
    return 1;
  }
  std::ifstream in(argv[9], std::ios::binary);
  std::ofstream out(argv[10], std::ios::binary);
  const size_t numel = static_cast<size_t>(n * c * s);
  std::vector<float> x(numel), dy(numel);
  const std::vector<int64_t> shape = {n, c, s};
  for (int step = 0; step < steps; ++step) {
    in.read(reinterpret_cast<char*>(x.data()), numel * sizeof(float));
    in.read(reinterpret_cast<char*>(dy.data()), numel * sizeof(float));
    if (!in) {
      std::fprintf(stderr, "short input at step %d\n", step);
      return 1;
    }
    auto y = (*bn)->Forward(x, shape);
    if (!y.ok()) {
      std::fprintf(stderr, "%s\n", y.status().ToString().c_str());
      return 1;
    }
    auto g = (*bn)->Backward(dy);
    if (!g.ok()) {
      std::fprintf(stderr, "%s\n", g.status().ToString().c_str());
      return 1;
    }
    for (const std::vector<float>* v : {&*y, &g->grad_input, &g->grad_weight}) {
      out.write(reinterpret_cast<const char*>(v->data()),
                v->size() * sizeof(float));
    }
  }
  return out ? 0 : 1;
}
