// Trains one remote BatchNorm2d step through the installed C++ client and
// prints what it got, for tests/packaging/test_cpp_package.py:
//   consumer ADDRESS LAYER_ID
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "client/cpp/client.h"
#include "client/cpp/remote_batch_norm.h"
#include "common/version.h"

namespace nc = normserve::client;

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: consumer ADDRESS LAYER_ID\n");
    return 2;
  }
  nc::ClientOptions options;
  options.target = argv[1];
  absl::StatusOr<std::unique_ptr<nc::Client>> client =
      nc::Client::Create(options);
  if (!client.ok()) return Fail(client.status());

  normserve::v1::BatchNormConfig config;
  config.set_num_features(2);
  auto bn = nc::RemoteBatchNorm::Create(**client, config, argv[2]);
  if (!bn.ok()) return Fail(bn.status());
  (*bn)->Train();

  // N=2, C=2, H=W=2: channel 0 holds 0..7, channel 1 the same times 2.
  const std::vector<int64_t> shape = {2, 2, 2, 2};
  std::vector<float> x(16);
  for (int n = 0; n < 2; ++n) {
    for (int c = 0; c < 2; ++c) {
      for (int i = 0; i < 4; ++i) {
        x[(n * 2 + c) * 4 + i] = static_cast<float>((n * 4 + i) * (c + 1));
      }
    }
  }
  auto y = (*bn)->Forward(x, shape);
  if (!y.ok()) return Fail(y.status());
  std::vector<float> dy(16, 0.0f);
  dy[0] = 1.0f;
  auto grads = (*bn)->Backward(dy);
  if (!grads.ok()) return Fail(grads.status());
  std::printf("client %s\n", normserve::kVersion);
  std::printf("mean %.6f %.6f\n", y->mean[0], y->mean[1]);
  std::printf("y0 %.6f\n", y->output[0]);
  std::printf("grad_bias %.6f %.6f\n", grads->grad_bias[0],
              grads->grad_bias[1]);
  return 0;
}
