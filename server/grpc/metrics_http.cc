#include "server/grpc/metrics_http.h"

#include <civetweb.h>
#include <google/protobuf/message_lite.h>
#include <grpcpp/support/status.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "server/core/metrics.h"

namespace normserve::server {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

int ServeMetrics(mg_connection* connection, void* /*unused*/) {
  const mg_request_info* request = mg_get_request_info(connection);
  const bool head = std::strcmp(request->request_method, "HEAD") == 0;
  if (!head && std::strcmp(request->request_method, "GET") != 0) {
    mg_send_http_error(connection, 405, "%s", "only GET and HEAD\n");
    return 405;
  }
  const std::string body = metrics::Registry::Default().Render();
  mg_send_http_ok(connection, kContentType,
                  static_cast<long long>(body.size()));
  if (!head) mg_write(connection, body.data(), body.size());
  return 200;
}

int ServeNotFound(mg_connection* connection, void* /*unused*/) {
  mg_send_http_error(connection, 404, "%s", "metrics are at /metrics\n");
  return 404;
}

constexpr absl::string_view kOurService = "/normserve.v1.Normalization/";

// "Forward" for our service's methods, the path without its "/" otherwise.
std::string MethodLabel(absl::string_view path) {
  if (absl::ConsumePrefix(&path, kOurService)) return std::string(path);
  absl::ConsumePrefix(&path, "/");
  return std::string(path);
}

// gRPC's name of a status code, as the server's clients print it (gRPC's
// codes and absl's share their numbers and names).
std::string CodeName(grpc::StatusCode code) {
  const std::string name =
      absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

size_t MessageBytes(const void* message) {
  return message == nullptr
             ? 0
             : static_cast<const google::protobuf::MessageLite*>(message)
                   ->ByteSizeLong();
}

class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit MetricsInterceptor(grpc::experimental::ServerRpcInfo* info)
      : method_(MethodLabel(info->method())),
        // Our service's messages are protobuf messages; others' may be raw
        // ByteBuffers (the default health service's are), so their sizes
        // are not read.
        sized_(absl::StartsWith(info->method(), kOurService)),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    const metrics::ServerMetrics& m = metrics::Server();
    if (sized_ && methods->QueryInterceptionHookPoint(
                      InterceptionHookPoints::POST_RECV_MESSAGE)) {
      received_ += MessageBytes(methods->GetRecvMessage());
    }
    if (sized_ && methods->QueryInterceptionHookPoint(
                      InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      sent_ += MessageBytes(methods->GetSendMessage());
    }
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::PRE_SEND_STATUS)) {
      const double seconds = std::chrono::duration<double>(
                                 std::chrono::steady_clock::now() - start_)
                                 .count();
      m.requests
          ->With({method_, CodeName(methods->GetSendStatus().error_code())})
          .Inc();
      m.duration->With({method_}).Observe(seconds);
      if (sized_) {
        m.received_bytes->With({method_}).Inc(received_);
        m.sent_bytes->With({method_}).Inc(sent_);
      }
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  const bool sized_;
  const std::chrono::steady_clock::time_point start_;
  uint64_t received_ = 0;
  uint64_t sent_ = 0;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(info);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(absl::string_view(address).substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_address ", address,
                     ": expected HOST:PORT (port 0 picks "
                     "a free one)"));
  }
  static std::once_flag library;
  std::call_once(library, [] { mg_init_library(0); });
  metrics::EnableJobTiming(true);

  const std::string host = address.substr(0, colon);
  const std::string ports = absl::StrCat(host, ":", port);
  const char* options[] = {
      "listening_ports",    ports.c_str(), "num_threads", "2",
      "request_timeout_ms", "10000",       nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  mg_init_data init;
  init.callbacks = &callbacks;
  init.user_data = nullptr;
  init.configuration_options = options;
  char error_text[256] = "";
  mg_error_data error;
  unsigned error_code = 0;
  error.code = &error_code;
  error.text = error_text;
  error.text_buffer_size = sizeof(error_text);
  mg_context* context = mg_start2(&init, &error);
  if (context == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "--metrics_address ", address, ": cannot serve metrics there: ",
        error_text[0] != '\0' ? error_text : "civetweb did not start"));
  }
  auto endpoint = std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint);
  endpoint->context_ = context;
  mg_set_request_handler(context, "/metrics$", ServeMetrics, nullptr);
  mg_set_request_handler(context, "/", ServeNotFound, nullptr);
  mg_server_port bound[4];
  const int count = mg_get_server_ports(context, 4, bound);
  endpoint->address_ =
      absl::StrCat(host, ":", count > 0 ? bound[0].port : port);
  return endpoint;
}

MetricsEndpoint::~MetricsEndpoint() {
  if (context_ != nullptr) mg_stop(context_);
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeMetricsInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>();
}

}  // namespace normserve::server
