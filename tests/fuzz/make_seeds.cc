// Writes the seed corpus of request_fuzzer: one file per interesting
// request, named after it, into the directory given as argv[1]. Each file is
// the selector byte of request_fuzzer.cc followed by the serialized request.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "normserve/v1/normserve.pb.h"

namespace pb = ::normserve::v1;

namespace {

std::string FloatBytes(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()),
                     values.size() * sizeof(float));
}

pb::Tensor Tensor(std::vector<int64_t> shape, std::vector<float> values) {
  pb::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(pb::DTYPE_FLOAT32);
  t.set_data(FloatBytes(values));
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  auto write = [&](const std::string& name, int selector,
                   const google::protobuf::Message& m) {
    std::ofstream out(dir + "/" + name, std::ios::binary);
    out << static_cast<char>(selector) << m.SerializeAsString();
  };
  pb::CreateLayerRequest create;
  create.set_layer_id("x1");
  create.mutable_batch_norm()->set_num_features(3);
  create.mutable_batch_norm()->set_eps(1e-3);
  write("create", 0, create);
  create.mutable_batch_norm()->mutable_cumulative_average();
  create.mutable_batch_norm()->set_layout(pb::LAYOUT_NHWC);
  create.mutable_batch_norm()->set_spatial_dims(2);
  write("create_nhwc", 0, create);
  pb::GetLayerRequest get;
  get.set_name("layers/bn");
  write("get", 1, get);
  pb::ListLayersRequest list;
  list.set_page_size(2);
  write("list", 2, list);
  pb::DeleteLayerRequest del;
  del.set_name("layers/nope");
  write("delete", 3, del);
  pb::ForwardRequest forward;
  forward.set_name("layers/bn");
  forward.set_training(true);
  forward.set_return_stats(true);
  *forward.mutable_input() =
      Tensor({2, 3, 2}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
  write("forward_train", 4, forward);
  forward.set_training(false);
  forward.mutable_input()->set_layout(pb::LAYOUT_NHWC);
  write("forward_eval_nhwc", 4, forward);
  forward.mutable_input()->set_dtype(pb::DTYPE_FLOAT16);
  forward.mutable_input()->set_data(std::string(24, '\x3c'));
  write("forward_half", 4, forward);
  pb::BackwardRequest backward;
  backward.set_name("layers/bn");
  backward.set_handle(1);
  backward.set_accumulate_grad(true);
  *backward.mutable_grad_output() =
      Tensor({2, 3, 2}, std::vector<float>(12, 1));
  write("backward", 5, backward);
  pb::UpdateRunningStatsRequest stats;
  stats.set_name("layers/bn");
  for (int c = 0; c < 3; ++c) {
    stats.add_mean(0.5f);
    stats.add_var(2.0f);
  }
  stats.set_count(8);
  write("update_stats", 6, stats);
  pb::OptimizerStepRequest step;
  step.set_name("layers/bn");
  step.mutable_sgd()->set_lr(0.1);
  step.mutable_sgd()->set_momentum(0.9);
  step.mutable_sgd()->set_nesterov(true);
  write("step", 7, step);
  pb::SetParametersRequest params;
  params.set_name("layers/bn");
  for (int c = 0; c < 3; ++c) {
    params.add_weight(2.0f);
    params.add_bias(-1.0f);
  }
  write("set_params", 8, params);
  pb::GetStateRequest get_state;
  get_state.set_name("layers/bn");
  write("get_state", 9, get_state);
  pb::LoadStateRequest load;
  load.set_name("layers/bn");
  (*load.mutable_state()->mutable_tensors())["running_mean"] =
      Tensor({3}, {0, 1, 2});
  pb::Tensor nbt;
  nbt.set_dtype(pb::DTYPE_INT64);
  nbt.set_data(std::string(8, '\0'));
  (*load.mutable_state()->mutable_tensors())["num_batches_tracked"] = nbt;
  load.set_allow_missing(true);
  write("load_state", 10, load);
  pb::TrainRequest train;
  train.set_request_id(7);
  *train.mutable_forward() = forward;
  write("train_forward", 11, train);
  train.Clear();
  *train.mutable_backward() = backward;
  write("train_backward", 11, train);
  // The sync group "sg": a stats-mode and a tensor-mode step, a backward
  // through the first handle, and a world_size change.
  pb::SyncForwardRequest sync_forward;
  sync_forward.set_step(1);
  sync_forward.set_training(true);
  sync_forward.set_count(4);
  for (double v : {0.5, 1.0, -1.0}) sync_forward.add_mean(v);
  for (double v : {2.0, 3.0, 1.0}) sync_forward.add_m2(v);
  write("sync_forward_stats", 12, sync_forward);
  sync_forward.clear_count();
  sync_forward.clear_mean();
  sync_forward.clear_m2();
  sync_forward.set_step(2);
  *sync_forward.mutable_input() =
      Tensor({2, 3, 2}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
  write("sync_forward_tensor", 12, sync_forward);
  pb::SyncBackwardRequest sync_backward;
  sync_backward.set_step(2);
  sync_backward.set_handle(1);
  *sync_backward.mutable_grad_output() =
      Tensor({2, 3, 2}, std::vector<float>(12, 1));
  sync_backward.mutable_sgd()->set_lr(0.1);
  write("sync_backward_tensor", 13, sync_backward);
  pb::SetWorldSizeRequest world;
  world.set_world_size(2);
  write("set_world_size", 14, world);
  return 0;
}
