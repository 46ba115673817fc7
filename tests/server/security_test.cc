// TLS, mutual TLS, bearer tokens and tenant isolation, over the wire against
// the real server in-process on port 0. Certificates are made here with the
// openssl command line (a CA, a second unrelated CA, server and client
// certificates) in a fresh temporary directory.
#include <grpcpp/generic/generic_stub.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/grpc/auth.h"
#include "server/grpc/server.h"

namespace normserve {
namespace {

namespace v1 = ::normserve::v1;
using client::Client;
using client::ClientOptions;
using ::testing::HasSubstr;

constexpr char kTokenA[] = "token-of-tenant-a-0123456789";
constexpr char kTokenB[] = "token-of-tenant-b-9876543210";

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Runs a shell command; true when it exits 0.
bool Shell(const std::string& command) {
  return std::system((command + " >/dev/null 2>&1").c_str()) == 0;
}

class Certificates {
 public:
  // Makes ca, other_ca, server (CN localhost, SAN 127.0.0.1), client (by
  // ca) and rogue_client (by other_ca) under a new temporary directory.
  static std::unique_ptr<Certificates> Make() {
    char templ[] = "/tmp/normserve_tls_XXXXXX";
    if (mkdtemp(templ) == nullptr) return nullptr;
    auto certs = std::unique_ptr<Certificates>(new Certificates(templ));
    const std::string& d = certs->dir_;
    WriteFile(d + "/san.ext",
              "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth,clientAuth\n");
    for (const char* ca : {"ca", "other_ca"}) {
      if (!Shell(absl::StrCat(
              "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=",
              ca, " -keyout ", d, "/", ca, ".key -out ", d, "/", ca, ".pem"))) {
        return nullptr;
      }
    }
    struct Leaf {
      const char* name;
      const char* ca;
    };
    for (Leaf leaf : {Leaf{"server", "ca"}, Leaf{"client", "ca"},
                      Leaf{"rogue_client", "other_ca"}}) {
      const std::string base = absl::StrCat(d, "/", leaf.name);
      if (!Shell(absl::StrCat("openssl req -newkey rsa:2048 -nodes -subj "
                              "/CN=localhost -keyout ",
                              base, ".key -out ", base, ".csr")) ||
          !Shell(absl::StrCat("openssl x509 -req -days 2 -in ", base,
                              ".csr -CA ", d, "/", leaf.ca, ".pem -CAkey ", d,
                              "/", leaf.ca, ".key -CAcreateserial -extfile ", d,
                              "/san.ext -out ", base, ".pem"))) {
        return nullptr;
      }
    }
    return certs;
  }
  ~Certificates() { Shell("rm -rf " + dir_); }

  std::string Path(const std::string& name) const {
    return absl::StrCat(dir_, "/", name);
  }

 private:
  explicit Certificates(std::string dir) : dir_(std::move(dir)) {}
  const std::string dir_;
};

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { certs_ = Certificates::Make().release(); }
  static void TearDownTestSuite() {
    delete certs_;
    certs_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(certs_, nullptr) << "openssl could not make the certificates";
  }

  void StartServer(bool mutual, bool health_listener = false) {
    server::ServerOptions options;
    options.address = "127.0.0.1:0";
    if (health_listener) options.health_address = "127.0.0.1:0";
    options.cpu_threads = 1;
    options.engine.num_workers = 1;
    options.tls_cert_file = certs_->Path("server.pem");
    options.tls_key_file = certs_->Path("server.key");
    if (mutual) options.tls_client_ca_file = certs_->Path("ca.pem");
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  // Lists layers with `credentials` (null: plaintext); the call's status.
  absl::Status Try(std::shared_ptr<grpc::ChannelCredentials> credentials) {
    ClientOptions options;
    options.target = server_->address();
    options.timeout = absl::Seconds(5);
    options.credentials = std::move(credentials);
    auto client = Client::Create(options);
    if (!client.ok()) return client.status();
    return (*client)->ListLayers(v1::ListLayersRequest()).status();
  }

  std::shared_ptr<grpc::ChannelCredentials> Tls(const std::string& ca,
                                                const std::string& cert = "",
                                                const std::string& key = "") {
    auto credentials = client::TlsCredentialsFromFiles(
        certs_->Path(ca), cert.empty() ? "" : certs_->Path(cert),
        key.empty() ? "" : certs_->Path(key));
    EXPECT_TRUE(credentials.ok()) << credentials.status();
    return credentials.ok() ? *credentials : nullptr;
  }

  static Certificates* certs_;
  std::unique_ptr<server::NormServer> server_;
};

Certificates* TlsTest::certs_ = nullptr;

TEST_F(TlsTest, TlsServer) {
  StartServer(/*mutual=*/false);
  EXPECT_EQ(Try(nullptr).code(), absl::StatusCode::kUnavailable)
      << "a plaintext client must not get through";
  EXPECT_EQ(Try(Tls("other_ca.pem")).code(), absl::StatusCode::kUnavailable)
      << "a client trusting another CA must not get through";
  EXPECT_TRUE(Try(Tls("ca.pem")).ok());
  // A client certificate is not asked for, and harmless.
  EXPECT_TRUE(Try(Tls("ca.pem", "client.pem", "client.key")).ok());
}

TEST_F(TlsTest, MutualTlsServer) {
  StartServer(/*mutual=*/true);
  EXPECT_EQ(Try(nullptr).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Try(Tls("ca.pem")).code(), absl::StatusCode::kUnavailable)
      << "a client without a certificate must not get through";
  EXPECT_EQ(Try(Tls("ca.pem", "rogue_client.pem", "rogue_client.key")).code(),
            absl::StatusCode::kUnavailable)
      << "a client certificate from another CA must not get through";
  EXPECT_EQ(Try(Tls("other_ca.pem", "client.pem", "client.key")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(Try(Tls("ca.pem", "client.pem", "client.key")).ok());
}

// Returns the status of a unary call of `method` with an empty request, sent
// as raw bytes to `channel`.
grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel,
                     const std::string& method) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(5));
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  return status;
}

TEST_F(TlsTest, PlaintextHealthListenerServesHealthAndNothingElse) {
  StartServer(/*mutual=*/false, /*health_listener=*/true);
  ASSERT_FALSE(server_->health_address().empty());
  ASSERT_NE(server_->health_address(), server_->address());
  EXPECT_EQ(Try(nullptr).code(), absl::StatusCode::kUnavailable)
      << "the main port must still require TLS";

  ClientOptions options;
  options.target = server_->health_address();
  options.timeout = absl::Seconds(5);
  auto health = Client::Create(options);  // Plaintext.
  ASSERT_TRUE(health.ok()) << health.status();
  absl::StatusOr<client::HealthStatus> status = (*health)->CheckHealth();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, client::HealthStatus::kServing);

  // No tenant data and no other service on the health port.
  EXPECT_EQ((*health)->ListLayers(v1::ListLayersRequest()).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ((*health)->GetLayer("bn").status().code(),
            absl::StatusCode::kUnimplemented);
  v1::CreateLayerRequest create;
  create.mutable_batch_norm()->set_num_features(2);
  EXPECT_EQ((*health)->CreateLayer(create).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(RawCall((*health)->channel(),
                    "/grpc.reflection.v1alpha.ServerReflection/"
                    "ServerReflectionInfo")
                .error_code(),
            grpc::StatusCode::UNIMPLEMENTED)
      << "server reflection must not be on the health port";

  // Draining: the health port says NOT_SERVING while an open Train stream
  // holds the main listener open, then closes.
  ClientOptions tls;
  tls.target = server_->address();
  tls.credentials = Tls("ca.pem");
  auto main_client = Client::Create(tls);
  ASSERT_TRUE(main_client.ok());
  auto stream = (*main_client)->StartTraining();
  ASSERT_TRUE(stream.ok());
  v1::GetLayerRequest get;
  get.set_name("none");
  EXPECT_EQ((*stream)->GetLayer(get).status().code(),
            absl::StatusCode::kNotFound);  // The stream is open.
  std::thread shutdown([this] { server_->Shutdown(absl::Seconds(3)); });
  client::HealthStatus seen = client::HealthStatus::kServing;
  for (int i = 0; i < 100 && seen == client::HealthStatus::kServing; ++i) {
    absl::StatusOr<client::HealthStatus> now = (*health)->CheckHealth();
    if (now.ok()) seen = *now;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(seen, client::HealthStatus::kNotServing);
  shutdown.join();
  server_->Wait();
  EXPECT_FALSE((*health)->CheckHealth().ok())
      << "the health port must close with the server";
}

TEST_F(TlsTest, HealthListenerOnATakenPortFailsAtStart) {
  StartServer(/*mutual=*/false, /*health_listener=*/true);
  server::ServerOptions options;
  options.address = "127.0.0.1:0";
  options.cpu_threads = 1;
  options.engine.num_workers = 1;
  options.health_address = server_->health_address();
  auto second = server::NormServer::Start(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("--health_address"));
}

TEST_F(TlsTest, BadServerFilesFailAtStart) {
  server::ServerOptions options;
  options.address = "127.0.0.1:0";
  options.tls_cert_file = certs_->Path("server.pem");
  EXPECT_EQ(server::NormServer::Start(options).status().code(),
            absl::StatusCode::kInvalidArgument);  // No key.
  options.tls_key_file = certs_->Path("missing.key");
  EXPECT_EQ(server::NormServer::Start(options).status().code(),
            absl::StatusCode::kNotFound);
  options.tls_key_file = certs_->Path("san.ext");
  EXPECT_EQ(server::NormServer::Start(options).status().code(),
            absl::StatusCode::kInvalidArgument);  // Not PEM.
  server::ServerOptions ca_only;
  ca_only.address = "127.0.0.1:0";
  ca_only.tls_client_ca_file = certs_->Path("ca.pem");
  EXPECT_EQ(server::NormServer::Start(ca_only).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TokenTableTest, ParsesAndRejectsWithoutEchoingTokens) {
  auto table = server::TokenTable::Parse(
      "# comment\n\n  token-of-tenant-a-0123456789  alpha\n"
      "another-token-for-alpha-0000\talpha\n");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 2u);
  EXPECT_EQ(*table->TenantFor(kTokenA), "alpha");
  EXPECT_EQ(table->TenantFor("nope").status().code(),
            absl::StatusCode::kUnauthenticated);

  const std::vector<std::string> bad = {
      "",                                       // No tokens.
      "short alpha\n",                          // Token too short.
      "token-of-tenant-a-0123456789\n",         // No tenant.
      "token-of-tenant-a-0123456789 a b\n",     // Extra field.
      "token-of-tenant-a-0123456789 al/pha\n",  // Bad tenant.
      "token-of-tenant-a-0123456789 a\ntoken-of-tenant-a-0123456789 b\n",
  };
  for (const std::string& text : bad) {
    auto parsed = server::TokenTable::Parse(text);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument)
        << text;
    EXPECT_THAT(std::string(parsed.status().message()),
                ::testing::Not(HasSubstr("0123456789")))
        << "an error message repeats a token";
  }
}

// TenantFor compares digests of whole tokens: only the exact token matches,
// whatever the presented token shares with a valid one.
TEST(TokenTableTest, OnlyTheExactTokenMatches) {
  auto table = server::TokenTable::Parse(
      "token-of-tenant-a-0123456789 alpha\n"
      "token-of-tenant-b-0123456789 beta\n"
      "x-third-token-for-alpha-00 alpha\n");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(*table->TenantFor("token-of-tenant-a-0123456789"), "alpha");
  EXPECT_EQ(*table->TenantFor("token-of-tenant-b-0123456789"), "beta");
  EXPECT_EQ(*table->TenantFor("x-third-token-for-alpha-00"), "alpha");
  const std::vector<std::string> wrong = {
      "",
      "token-of-tenant-a-012345678",                      // A prefix.
      "token-of-tenant-a-01234567890",                    // Longer.
      "token-of-tenant-a-0123456789 ",                    // Trailing space.
      "Token-of-tenant-a-0123456789",                     // Case differs.
      "token-of-tenant-a-0123456788",                     // Last byte differs.
      "uoken-of-tenant-a-0123456789",                     // First byte differs.
      std::string("token-of-tenant-a-0123456789\0", 29),  // Embedded NUL.
      "token-of-tenant-b-0123456789token-of-tenant-a-0123456789",
  };
  for (const std::string& token : wrong) {
    absl::StatusOr<std::string> tenant = table->TenantFor(token);
    EXPECT_EQ(tenant.status().code(), absl::StatusCode::kUnauthenticated)
        << "token of " << token.size() << " bytes";
    EXPECT_THAT(std::string(tenant.status().message()), HasSubstr("not valid"));
  }
}

// Two tenants; every call checked for isolation.
class TenantTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/normserve_tokens_XXXXXX";
    const int fd = mkstemp(templ);
    ASSERT_GE(fd, 0);
    close(fd);
    tokens_path_ = templ;
    WriteFile(tokens_path_, absl::StrCat("# tenants\n", kTokenA, " alpha\n",
                                         kTokenB, " beta\n"));
    server::ServerOptions options;
    options.address = "127.0.0.1:0";
    options.cpu_threads = 1;
    options.engine.num_workers = 2;
    options.auth_tokens_file = tokens_path_;
    options.engine.max_layers_per_tenant = 3;
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    a_ = MakeClient(kTokenA);
    b_ = MakeClient(kTokenB);
    none_ = MakeClient("");
    bad_ = MakeClient("not-a-valid-token-at-all-xx");
  }
  void TearDown() override { unlink(tokens_path_.c_str()); }

  std::unique_ptr<Client> MakeClient(const std::string& token) {
    ClientOptions options;
    options.target = server_->address();
    options.timeout = absl::Seconds(20);
    options.bearer_token = token;
    return *Client::Create(options);
  }

  static v1::CreateLayerRequest CreateRequest(const std::string& id) {
    v1::CreateLayerRequest request;
    request.set_layer_id(id);
    request.mutable_batch_norm()->set_num_features(2);
    return request;
  }

  static v1::ForwardRequest Forward(const std::string& name) {
    v1::ForwardRequest request;
    request.set_name(name);
    request.set_training(true);
    *request.mutable_input() = *client::MakeTensor(
        std::vector<float>{1, 2, 3, 4, 5, 6, 7, 9}, {2, 2, 2});
    return request;
  }

  // Every call on `name` as `client`; the status codes in a fixed order.
  std::vector<absl::StatusCode> EveryCall(Client& client,
                                          const std::string& name,
                                          uint64_t handle) {
    std::vector<absl::StatusCode> codes;
    codes.push_back(client.GetLayer(name).status().code());
    codes.push_back(client.Forward(Forward(name)).status().code());
    v1::BackwardRequest backward;
    backward.set_name(name);
    backward.set_handle(handle);
    backward.set_retain_context(true);
    backward.set_accumulate_grad(true);
    *backward.mutable_grad_output() =
        *client::MakeTensor(std::vector<float>(8, 1.0f), {2, 2, 2});
    codes.push_back(client.Backward(backward).status().code());
    v1::UpdateRunningStatsRequest stats;
    stats.set_name(name);
    stats.add_mean(0);
    stats.add_mean(0);
    stats.add_var(1);
    stats.add_var(1);
    stats.set_count(4);
    codes.push_back(client.UpdateRunningStats(stats).status().code());
    v1::OptimizerStepRequest step;
    step.set_name(name);
    step.mutable_sgd()->set_lr(0.1);
    codes.push_back(client.OptimizerStep(step).status().code());
    v1::SetParametersRequest params;
    params.set_name(name);
    params.add_weight(1);
    params.add_weight(1);
    codes.push_back(client.SetParameters(params).status().code());
    auto state = client.GetState(name);
    codes.push_back(state.status().code());
    v1::LoadStateRequest load;
    load.set_name(name);
    load.set_allow_missing(true);
    codes.push_back(client.LoadState(load).status().code());
    // The same through a Train stream.
    auto stream = client.StartTraining();
    if (stream.ok()) {
      codes.push_back((*stream)->Forward(Forward(name)).status().code());
      v1::GetLayerRequest get;
      get.set_name(name);
      codes.push_back((*stream)->GetLayer(get).status().code());
      (*stream)->Finish().IgnoreError();
    } else {
      codes.push_back(stream.status().code());
    }
    return codes;
  }

  std::string tokens_path_;
  std::unique_ptr<server::NormServer> server_;
  std::unique_ptr<Client> a_, b_, none_, bad_;
};

TEST_F(TenantTest, CallsWithoutAValidTokenAreUnauthenticated) {
  ASSERT_TRUE(a_->CreateLayer(CreateRequest("bn")).ok());
  for (Client* client : {none_.get(), bad_.get()}) {
    auto status = client->CreateLayer(CreateRequest("x"));
    EXPECT_EQ(status.status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_THAT(std::string(status.status().message()),
                ::testing::Not(HasSubstr("not-a-valid-token")));
    EXPECT_EQ(client->ListLayers(v1::ListLayersRequest()).status().code(),
              absl::StatusCode::kUnauthenticated);
    EXPECT_EQ(client->DeleteLayer("bn").code(),
              absl::StatusCode::kUnauthenticated);
    for (absl::StatusCode code : EveryCall(*client, "layers/bn", 1)) {
      EXPECT_EQ(code, absl::StatusCode::kUnauthenticated);
    }
    // Health needs no token.
    auto health = client->CheckHealth();
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, client::HealthStatus::kServing);
  }
  // A token without "Bearer " is refused as well.
  ClientOptions options;
  options.target = server_->address();
  auto raw = *Client::Create(options);
  grpc::ClientContext context;
  context.AddMetadata("authorization", kTokenA);
  auto stub = v1::Normalization::NewStub(raw->channel());
  v1::ListLayersResponse list;
  EXPECT_EQ(
      stub->ListLayers(&context, v1::ListLayersRequest(), &list).error_code(),
      grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(TenantTest, TenantsAreIsolatedOnEveryCall) {
  ASSERT_TRUE(a_->CreateLayer(CreateRequest("bn")).ok());
  auto forward = a_->Forward(Forward("layers/bn"));
  ASSERT_TRUE(forward.ok()) << forward.status();
  const int64_t version = a_->GetLayer("bn")->version();

  // Beta sees nothing of alpha's layer, whatever it calls.
  for (absl::StatusCode code : EveryCall(*b_, "layers/bn", forward->handle())) {
    EXPECT_EQ(code, absl::StatusCode::kNotFound);
  }
  EXPECT_EQ(b_->DeleteLayer("bn").code(), absl::StatusCode::kNotFound);
  auto b_list = b_->ListAllLayers();
  ASSERT_TRUE(b_list.ok());
  EXPECT_TRUE(b_list->empty());
  // Alpha's layer did not move.
  EXPECT_EQ(a_->GetLayer("bn")->version(), version);

  // Beta may use the same id for its own layer, apart from alpha's.
  ASSERT_TRUE(b_->CreateLayer(CreateRequest("bn")).ok());
  ASSERT_TRUE(b_->CreateLayer(CreateRequest("only-beta")).ok());
  EXPECT_EQ(a_->GetLayer("only-beta").status().code(),
            absl::StatusCode::kNotFound);
  auto a_list = a_->ListAllLayers();
  ASSERT_TRUE(a_list.ok());
  ASSERT_EQ(a_list->size(), 1u);
  EXPECT_EQ((*a_list)[0].name(), "layers/bn");
  EXPECT_EQ(b_->ListAllLayers()->size(), 2u);
  // Pagination stays within the tenant.
  v1::ListLayersRequest page;
  page.set_page_size(1);
  auto first = b_->ListLayers(page);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->layers_size(), 1);
  page.set_page_token(first->next_page_token());
  auto second = b_->ListLayers(page);
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(second->layers_size(), 1);
  EXPECT_EQ(second->layers(0).name(), "layers/only-beta");
  EXPECT_TRUE(second->next_page_token().empty());

  // Each tenant's calls work on its own layer.
  for (absl::StatusCode code : EveryCall(*a_, "layers/bn", forward->handle())) {
    EXPECT_EQ(code, absl::StatusCode::kOk);
  }
  ASSERT_TRUE(b_->DeleteLayer("bn").ok());
  EXPECT_TRUE(a_->GetLayer("bn").ok());
}

TEST_F(TenantTest, LayersPerTenantLimit) {
  for (const char* id : {"l1", "l2", "l3"}) {
    ASSERT_TRUE(a_->CreateLayer(CreateRequest(id)).ok());
  }
  auto over = a_->CreateLayer(CreateRequest("l4"));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(over.status().message()),
              HasSubstr("--max_layers_per_tenant"));
  // Another tenant has its own allowance.
  EXPECT_TRUE(b_->CreateLayer(CreateRequest("l1")).ok());
  ASSERT_TRUE(a_->DeleteLayer("l1").ok());
  EXPECT_TRUE(a_->CreateLayer(CreateRequest("l4")).ok());
}

}  // namespace
}  // namespace normserve
