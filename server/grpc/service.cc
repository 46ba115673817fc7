#include "server/grpc/service.h"

#include <chrono>
#include <deque>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/grpc/status.h"

namespace normserve::server {
namespace {

using grpc::CallbackServerContext;
using grpc::ServerUnaryReactor;

// Finishes `context`'s default reactor when the operation completes.
Operations::Done FinishWhenDone(ServerUnaryReactor* reactor) {
  return
      [reactor](absl::Status status) { reactor->Finish(ToGrpcStatus(status)); };
}

ServerUnaryReactor* FinishNow(CallbackServerContext* context,
                              const absl::Status& status) {
  ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// Finishes a Train stream at once with `status` (not admitted).
class RejectedStream final
    : public grpc::ServerBidiReactor<pb::TrainRequest, pb::TrainResponse> {
 public:
  explicit RejectedStream(const absl::Status& status) {
    Finish(ToGrpcStatus(status));
  }
  void OnDone() override { delete this; }
};

// Starts a call that runs on the executor: `start(ops, reactor)` when the
// call is admitted, else finishes it with the reason.
template <typename Start>
ServerUnaryReactor* StartAsync(CallbackServerContext* context,
                               absl::StatusOr<Operations> ops, Start start) {
  ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!ops.ok()) {
    reactor->Finish(ToGrpcStatus(ops.status()));
    return reactor;
  }
  start(*ops, FinishWhenDone(reactor));
  return reactor;
}

// A unary call whose operation may wait long (a sync group's step, until
// its other ranks arrive): it finishes on the first of the operation's
// answer and the call's cancellation (the client gone, its deadline past,
// or the server's shutdown past its grace), so no drain waits for a
// barrier. The operation fills a response of its own, moved into the
// call's only if the call is still open; an answer after the cancellation
// is dropped. A cancelled call runs `withdraw`, which takes the rank's part
// out of its step (the other ranks then wait for a replacement).
template <typename Response>
class WaitingCall final : public ServerUnaryReactor {
 public:
  WaitingCall(Response* response, std::function<void()> withdraw)
      : state_(std::make_shared<State>()),
        response_(response),
        withdraw_(std::move(withdraw)) {
    state_->call = this;
  }

  // The operation's response and completion.
  Response* scratch() { return &state_->response; }
  Operations::Done done() {
    return [state = state_](absl::Status status) {
      WaitingCall* call = nullptr;
      {
        absl::MutexLock lock(&state->mu);
        if (state->call == nullptr || state->finished) return;
        state->finished = true;
        call = state->call;
        if (status.ok()) call->response_->Swap(&state->response);
      }
      // Outside the lock: OnDone, which takes it, may run inside Finish.
      call->Finish(ToGrpcStatus(status));
    };
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&state_->mu);
      if (state_->finished) return;
      state_->finished = true;
    }
    if (withdraw_) withdraw_();
    Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                        "the call was cancelled while it waited"));
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&state_->mu);
      state_->call = nullptr;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mu;
    WaitingCall* call ABSL_GUARDED_BY(mu) = nullptr;
    bool finished ABSL_GUARDED_BY(mu) = false;
    Response response;
  };

  const std::shared_ptr<State> state_;
  Response* const response_;
  const std::function<void()> withdraw_;
};

void RunSync(Operations& ops, const pb::SyncForwardRequest& request,
             pb::SyncForwardResponse* response, Operations::Done done) {
  ops.SyncForward(request, response, std::move(done));
}

void RunSync(Operations& ops, const pb::SyncBackwardRequest& request,
             pb::SyncBackwardResponse* response, Operations::Done done) {
  ops.SyncBackward(request, response, std::move(done));
}

// A sync call: waits for its step, and withdraws its part when cancelled.
template <typename Request, typename Response>
ServerUnaryReactor* StartWaiting(CallbackServerContext* context,
                                 absl::StatusOr<Operations> ops,
                                 const Request& request, Response* response) {
  if (!ops.ok()) return FinishNow(context, ops.status());
  // The withdrawal keeps what it needs: the request is gone after OnDone.
  Request key;
  key.set_name(request.name());
  key.set_step(request.step());
  key.set_rank(request.rank());
  key.set_request_id(request.request_id());
  auto* call = new WaitingCall<Response>(
      response,
      [ops = *ops, key = std::move(key)]() mutable { ops.SyncWithdraw(key); });
  RunSync(*ops, request, call->scratch(), call->done());
  return call;
}

// One Train stream. Operations are started in arrival order and may finish
// out of order (different layers run in parallel); responses are written in
// arrival order, one write at a time. At most kMaxInFlight operations are
// outstanding: reading pauses until the oldest answer is written.
//
// Every decision is taken under mu_ (NextActions) and carried out after it
// is released (Run); Finish is the last thing Run does, since OnDone may
// delete the reactor right after it.
class TrainReactor final
    : public grpc::ServerBidiReactor<pb::TrainRequest, pb::TrainResponse> {
 public:
  // `open_streams` counts open streams; this one is counted already and
  // uncounts itself when done.
  TrainReactor(Operations ops, std::atomic<size_t>* open_streams)
      : ops_(std::move(ops)), open_streams_(open_streams) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    Slot* slot = nullptr;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok) {
        reads_done_ = true;
      } else {
        auto owned = std::make_unique<Slot>();
        owned->request.Swap(&incoming_);
        owned->response.set_request_id(owned->request.request_id());
        slot = owned.get();
        pending_.push_back(std::move(owned));
      }
    }
    // The slot stays in pending_ until its answer is written, which needs
    // OpDone first: it outlives this call.
    if (slot != nullptr) {
      ops_.Dispatch(
          slot->request, &slot->response,
          [this, slot](absl::Status status) { OpDone(slot, status); });
    }
    Run(Decide());
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      pending_.pop_front();
      if (!ok) broken_ = true;
    }
    Run(Decide());
  }

  void OnDone() override {
    open_streams_->fetch_sub(1);
    delete this;
  }

 private:
  static constexpr size_t kMaxInFlight = 64;

  struct Slot {
    pb::TrainRequest request;
    pb::TrainResponse response;
    bool ready = false;
  };

  struct Actions {
    pb::TrainResponse* write = nullptr;
    bool read = false;
    bool finish = false;
    grpc::Status status;
  };

  void OpDone(Slot* slot, const absl::Status& status) {
    if (!status.ok()) {
      const uint64_t id = slot->response.request_id();
      slot->response.Clear();
      slot->response.set_request_id(id);
    }
    slot->response.mutable_status()->set_code(static_cast<int>(status.code()));
    slot->response.mutable_status()->set_message(std::string(status.message()));
    {
      absl::MutexLock lock(&mu_);
      slot->ready = true;
    }
    Run(Decide());
  }

  Actions Decide() {
    absl::MutexLock lock(&mu_);
    Actions actions;
    if (broken_) {
      // The client is gone: drop answers instead of writing them.
      while (!writing_ && !pending_.empty() && pending_.front()->ready) {
        pending_.pop_front();
      }
    } else if (!writing_ && !pending_.empty() && pending_.front()->ready) {
      writing_ = true;
      actions.write = &pending_.front()->response;
    }
    if (!reading_ && !reads_done_ && !broken_ &&
        pending_.size() < kMaxInFlight) {
      reading_ = true;
      actions.read = true;
    }
    if ((reads_done_ || broken_) && !reading_ && pending_.empty() &&
        !writing_ && !finished_) {
      finished_ = true;
      actions.finish = true;
      if (broken_) {
        actions.status = grpc::Status(grpc::StatusCode::CANCELLED,
                                      "the client stopped reading answers");
      }
    }
    return actions;
  }

  void Run(const Actions& actions) {
    if (actions.write != nullptr) StartWrite(actions.write);
    if (actions.read) StartRead(&incoming_);
    if (actions.finish) Finish(actions.status);
  }

  Operations ops_;
  std::atomic<size_t>* const open_streams_;
  pb::TrainRequest incoming_;
  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> pending_ ABSL_GUARDED_BY(mu_);
  bool reading_ ABSL_GUARDED_BY(mu_) = true;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

ServerUnaryReactor* NormalizationService::CreateLayer(
    CallbackServerContext* context, const pb::CreateLayerRequest* request,
    pb::Layer* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.CreateLayer(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::GetLayer(
    CallbackServerContext* context, const pb::GetLayerRequest* request,
    pb::Layer* response) {
  absl::StatusOr<Operations> ops = Begin(context);
  if (!ops.ok()) return FinishNow(context, ops.status());
  return FinishNow(context, ops->GetLayer(*request, response));
}

ServerUnaryReactor* NormalizationService::ListLayers(
    CallbackServerContext* context, const pb::ListLayersRequest* request,
    pb::ListLayersResponse* response) {
  absl::StatusOr<Operations> ops = Begin(context);
  if (!ops.ok()) return FinishNow(context, ops.status());
  return FinishNow(context, ops->ListLayers(*request, response));
}

ServerUnaryReactor* NormalizationService::DeleteLayer(
    CallbackServerContext* context, const pb::DeleteLayerRequest* request,
    pb::DeleteLayerResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.DeleteLayer(*request, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::Forward(
    CallbackServerContext* context, const pb::ForwardRequest* request,
    pb::ForwardResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.Forward(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::Backward(
    CallbackServerContext* context, const pb::BackwardRequest* request,
    pb::BackwardResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.Backward(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::UpdateRunningStats(
    CallbackServerContext* context,
    const pb::UpdateRunningStatsRequest* request,
    pb::UpdateRunningStatsResponse* response) {
  return StartAsync(
      context, Begin(context), [&](Operations& ops, Operations::Done done) {
        ops.UpdateRunningStats(*request, response, std::move(done));
      });
}

ServerUnaryReactor* NormalizationService::OptimizerStep(
    CallbackServerContext* context, const pb::OptimizerStepRequest* request,
    pb::OptimizerStepResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.OptimizerStep(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::SetWorldSize(
    CallbackServerContext* context, const pb::SetWorldSizeRequest* request,
    pb::SetWorldSizeResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.SetWorldSize(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::SetParameters(
    CallbackServerContext* context, const pb::SetParametersRequest* request,
    pb::SetParametersResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.SetParameters(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::GetState(
    CallbackServerContext* context, const pb::GetStateRequest* request,
    pb::GetStateResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.GetState(*request, response, std::move(done));
                    });
}

ServerUnaryReactor* NormalizationService::SyncForward(
    CallbackServerContext* context, const pb::SyncForwardRequest* request,
    pb::SyncForwardResponse* response) {
  return StartWaiting(context, Begin(context), *request, response);
}

ServerUnaryReactor* NormalizationService::SyncBackward(
    CallbackServerContext* context, const pb::SyncBackwardRequest* request,
    pb::SyncBackwardResponse* response) {
  return StartWaiting(context, Begin(context), *request, response);
}

ServerUnaryReactor* NormalizationService::LoadState(
    CallbackServerContext* context, const pb::LoadStateRequest* request,
    pb::LoadStateResponse* response) {
  return StartAsync(context, Begin(context),
                    [&](Operations& ops, Operations::Done done) {
                      ops.LoadState(*request, response, std::move(done));
                    });
}

grpc::ServerBidiReactor<pb::TrainRequest, pb::TrainResponse>*
NormalizationService::Train(CallbackServerContext* context) {
  absl::StatusOr<Operations> ops = Begin(context);
  if (!ops.ok()) return new RejectedStream(ops.status());
  const size_t open = open_streams_.fetch_add(1) + 1;
  if (options_.max_streams > 0 && open > options_.max_streams) {
    open_streams_.fetch_sub(1);
    return new RejectedStream(absl::ResourceExhaustedError(absl::StrCat(
        "the server has ", options_.max_streams,
        " Train streams open, its limit (--max_streams); retry later")));
  }
  return new TrainReactor(*std::move(ops), &open_streams_);
}

absl::StatusOr<Operations> NormalizationService::Begin(
    CallbackServerContext* context) {
  if (draining_.load()) {
    return absl::UnavailableError(
        "the server is shutting down; retry on another replica");
  }
  absl::StatusOr<std::string> tenant = Authenticate(options_.tokens, *context);
  if (!tenant.ok()) return tenant.status();
  return Operations(engine_, *std::move(tenant), [context]() -> absl::Status {
    if (context->IsCancelled()) {
      return absl::CancelledError("the call was cancelled before it ran");
    }
    if (context->deadline() < std::chrono::system_clock::now()) {
      return absl::DeadlineExceededError(
          "the call's deadline passed before it ran");
    }
    return absl::OkStatus();
  });
}

}  // namespace normserve::server
