// normserve-echo-server: a plain gRPC echo (bench/rpc/echo.proto), the
// baseline of the service-overhead benchmark. Built like normserve's own
// server (callback API, the same message-size settings) but without layers,
// executor or compute: each answer is a copy of the request, made on the
// gRPC callback thread.
//
//   normserve-echo-server [--address HOST:PORT]   (default 127.0.0.1:0)
//
// Prints "normserve-echo listening on HOST:PORT" when ready; SIGTERM or
// SIGINT stops it.
#include <grpcpp/grpcpp.h>
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "bench/echo.grpc.pb.h"

namespace {

using normserve::bench::EchoMessage;

// Echoes each message of one stream, one read and one write at a time.
class EchoStreamReactor final
    : public grpc::ServerBidiReactor<EchoMessage, EchoMessage> {
 public:
  EchoStreamReactor() { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    response_.mutable_payload()->assign(request_.payload());
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  EchoMessage request_;
  EchoMessage response_;
};

class EchoService final : public normserve::bench::Echo::CallbackService {
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* context,
                                 const EchoMessage* request,
                                 EchoMessage* response) override {
    response->mutable_payload()->assign(request->payload());
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerBidiReactor<EchoMessage, EchoMessage>* EchoStream(
      grpc::CallbackServerContext* context) override {
    return new EchoStreamReactor();
  }
};

}  // namespace

int main(int argc, char** argv) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  std::string address = "127.0.0.1:0";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--address" && i + 1 < argc) {
      address = argv[++i];
    } else if (arg.rfind("--address=", 0) == 0) {
      address = arg.substr(10);
    } else {
      std::fprintf(stderr,
                   "usage: normserve-echo-server [--address HOST:PORT]\n");
      return 2;
    }
  }

  EchoService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  // The same limits as normserve: one message carries a whole tensor.
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "normserve-echo-server: could not listen on %s\n",
                 address.c_str());
    return 1;
  }
  std::printf("normserve-echo listening on %s:%d\n",
              address.substr(0, address.rfind(':')).c_str(), port);
  std::fflush(stdout);

  std::thread stopper([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    server->Shutdown();
  });
  server->Wait();
  stopper.join();
  return 0;
}
