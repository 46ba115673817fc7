// The load generator's engine: runs a sweep of steps (batch size x
// concurrency) against a normserve server and measures each one.
//
// A step runs `concurrency` workers, each a thread with its own layer
// (layer i % layers), its own Train stream when the mix trains, and one of
// `channels` gRPC channels (each its own TCP connection). A worker issues one
// operation at a time, picked from the mix with the step's seed:
//   train    Forward(training) + Backward(accumulate_grad) + OptimizerStep
//            (SGD, lr) over the worker's Train stream: one "request";
//   forward  unary Forward, training, nothing saved for backward;
//   eval     unary Forward, eval mode;
//   sync     one training step of a sync group in tensor mode: unary
//            SyncForward + SyncBackward with one server-side SGD step
//            (sgd, lr) per step of the group. The workers form groups of
//            sync_world_size ranks (worker i is rank i % K of group i / K)
//            and take every step together: it runs alone in the mix,
//            closed loop, and a group's ranks decide together (an
//            in-process rendezvous between steps) when to stop, so that no
//            rank waits at a barrier its peers left. Not verified.
// Closed loop by default (the next request starts when the previous one
// returns). With a target rate, each worker sends on a fixed schedule
// (rate / concurrency per worker) and latency is measured from the scheduled
// send time, so a server that falls behind shows its queueing in the
// percentiles instead of slowing the generator down (no coordinated
// omission). A worker whose backlog outlasts the step by one more duration
// stops and counts what it did not send as "unsent".
//
// Warm-up requests are not counted. A counted request is one scheduled (open
// loop) or started (closed loop) after the warm-up and before the end; the
// step's window runs from the first counted start to the last counted
// completion, and every rate is over that window.
//
// Verification: the first counted response of every worker, then one in
// `verify_every`, at most `verify_max` per worker and step, is checked
// against the double-precision reference (kernels/reference) using the
// layer's state fetched just before (and, for operations that change it,
// just after) the operation. The time spent fetching state and computing the
// reference is not part of any latency, and pauses the worker's schedule.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/load/load_stats.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::load {

enum class Op { kTrain = 0, kForward = 1, kEval = 2, kSync = 3 };
inline constexpr int kNumOps = 4;
// "train", "forward", "eval", "sync".
const char* OpName(Op op);
std::vector<std::string> OpNames();

struct LoadOptions {
  // Server address (host:port). Load tests target loopback addresses only.
  std::string address = "127.0.0.1:50051";
  // PEM file of the root certificate to trust; non-empty enables TLS.
  std::string tls_ca_file;
  // Batch sizes N to sweep.
  std::vector<int64_t> batch_sizes = {1, 8, 64};
  // (C, *spatial): one sample's shape. Inputs are (N, C, *spatial).
  std::vector<int64_t> feature_shape = {64, 8, 8};
  v1::DType dtype = v1::DTYPE_FLOAT32;
  v1::Layout layout = v1::LAYOUT_NCHW;
  // Layers created for the sweep; 0 means one per worker of the largest
  // concurrency (so no two workers share a layer).
  int layers = 0;
  // Concurrent workers (streams) per step; each value is a sweep step.
  std::vector<int64_t> concurrency = {1};
  // gRPC channels (TCP connections) the workers are spread over.
  int channels = 1;
  // Length of the measured part of a step; used when requests == 0.
  double duration_s = 3;
  // Counted requests per step, all workers together; 0: by duration.
  int64_t requests = 0;
  // Uncounted warm-up at the start of every step.
  double warmup_s = 0.5;
  // Operation mix as (op, weight).
  std::vector<std::pair<Op, int>> mix = {{Op::kForward, 1}};
  // Target requests/s of a step, all workers together; 0: closed loop.
  double rate = 0;
  uint64_t seed = 1;
  // Verify one in this many counted responses per worker (and the first);
  // 0 turns verification off.
  int verify_every = 50;
  int verify_max = 4;
  // SGD learning rate of the train cycle's OptimizerStep (and of the sync
  // cycle's SyncBackward sgd).
  double lr = 0.01;
  // Ranks per sync group (the sync op); each concurrency must be a
  // multiple of it.
  int sync_world_size = 2;
  // Deadline of one unary call; of a Train stream, the whole step plus this.
  double timeout_s = 60;
  // Print a live progress line (to stderr; the caller decides whether it is
  // a terminal).
  bool progress = false;
};

// Measurements of one operation kind (or of all together).
struct OpStats {
  int64_t requests = 0;  // Counted, failed ones included.
  int64_t ok = 0;
  int64_t bytes_sent = 0;      // Serialized request messages of ok requests.
  int64_t bytes_received = 0;  // Serialized responses of ok requests.
  LatencySummary latency_ms;   // Of ok requests.
};

struct StepResult {
  int64_t batch_size = 0;
  int64_t concurrency = 0;
  int channels = 0;
  int layers = 0;
  double target_rate = 0;  // 0: closed loop.
  std::vector<int64_t> input_shape;
  int64_t input_bytes = 0;  // One input tensor's data.
  double window_s = 0;
  OpStats total;
  Rates rates;  // Over ok requests.
  // Failed requests by gRPC status code name (e.g. "UNAVAILABLE").
  std::map<std::string, int64_t> errors;
  int64_t error_count = 0;
  int64_t unsent = 0;  // Open loop: scheduled but never sent.
  int64_t verified = 0;
  int64_t verify_failed = 0;
  int64_t verify_skipped = 0;  // State changed by another worker meanwhile.
  std::vector<std::string> verify_messages;  // The first few failures.
  std::map<std::string, OpStats> ops;        // By op name.
};

// Runs the whole sweep: creates the layers, runs every step (batch sizes
// outer, concurrency inner), deletes the layers. `on_step` is called after
// each step. Fails when the server cannot be reached or a layer cannot be
// created; failures of measured requests are counted, not returned.
absl::StatusOr<std::vector<StepResult>> RunSweep(
    const LoadOptions& options,
    const std::function<void(const StepResult&)>& on_step);

// Returns the name of a grpc::StatusCode value, e.g. "DEADLINE_EXCEEDED".
std::string StatusCodeName(int code);

}  // namespace normserve::load
