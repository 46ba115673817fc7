#include "server/core/engine.h"

#include <memory>
#include <string>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/layers/batch_norm_layer.h"

namespace normserve::server {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Engine> MakeEngine(EngineOptions options = {}) {
  auto engine = Engine::Create(options, kernels::CreateCpuBackend({}));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return *std::move(engine);
}

BatchNormConfig Params(int64_t c) {
  BatchNormConfig config;
  config.num_features = c;
  return config;
}

LayerConfig Config(int64_t c) { return BatchNormLayerConfig(Params(c)); }
LayerConfig Config(const BatchNormConfig& params, std::string device = "") {
  return BatchNormLayerConfig(params, std::move(device));
}

TEST(EngineTest, CreateGetDelete) {
  auto engine = MakeEngine();
  absl::StatusOr<LayerInfo> created = engine->CreateLayer("bn1", Config(8));
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->name, "layers/bn1");
  EXPECT_EQ(created->config.kind, "batch_norm");
  EXPECT_EQ(created->config.device, "cpu");
  const BatchNormConfig* params = created->config.As<BatchNormConfig>();
  ASSERT_NE(params, nullptr);
  EXPECT_EQ(params->num_features, 8);
  EXPECT_EQ(params->eps, 1e-5);
  ASSERT_TRUE(params->momentum.has_value());
  EXPECT_EQ(*params->momentum, 0.1);
  EXPECT_EQ(created->version, 1);

  EXPECT_EQ(engine->GetLayer("layers/bn1")->name, "layers/bn1");
  EXPECT_EQ(engine->GetLayer("bn1")->name, "layers/bn1");
  ASSERT_TRUE(engine->DeleteLayer("layers/bn1").ok());
  absl::Status gone = engine->GetLayer("bn1").status();
  EXPECT_EQ(gone.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(gone.message(), HasSubstr("layers/bn1 not found"));
  EXPECT_EQ(engine->DeleteLayer("bn1").code(), absl::StatusCode::kNotFound);
}

TEST(EngineTest, DuplicateIdIsAlreadyExists) {
  auto engine = MakeEngine();
  ASSERT_TRUE(engine->CreateLayer("same", Config(4)).ok());
  absl::Status dup = engine->CreateLayer("same", Config(4)).status();
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(dup.message(), HasSubstr("layers/same already exists"));
}

TEST(EngineTest, ServerChosenIdsAreUnique) {
  auto engine = MakeEngine();
  std::string a = engine->CreateLayer("", Config(4))->name;
  std::string b = engine->CreateLayer("", Config(4))->name;
  EXPECT_NE(a, b);
  EXPECT_TRUE(engine->GetLayer(a).ok());
}

TEST(EngineTest, RejectsBadIdsAndConfigs) {
  auto engine = MakeEngine();
  for (const char* id : {"Upper", "-dash", "has space", "layers/"}) {
    absl::Status status = engine->CreateLayer(id, Config(4)).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << id;
    EXPECT_THAT(status.message(), HasSubstr("expected 'layers/{id}'")) << id;
  }
  BatchNormConfig config = Params(0);
  EXPECT_THAT(engine->CreateLayer("a", Config(config)).status().message(),
              HasSubstr("num_features is 0"));
  config = Params(4);
  config.eps = 0;
  EXPECT_THAT(engine->CreateLayer("a", Config(config)).status().message(),
              HasSubstr("eps is 0; expected a finite value > 0"));
  config.eps = -1;
  EXPECT_EQ(engine->CreateLayer("a", Config(config)).status().code(),
            absl::StatusCode::kInvalidArgument);
  config = Params(4);
  config.momentum = 1.5;
  EXPECT_THAT(engine->CreateLayer("a", Config(config)).status().message(),
              HasSubstr("momentum is 1.5; expected a value in [0, 1]"));
  config.momentum = -0.1;
  EXPECT_EQ(engine->CreateLayer("a", Config(config)).status().code(),
            absl::StatusCode::kInvalidArgument);
  config = Params(1 + kMaxNumFeatures);
  EXPECT_THAT(engine->CreateLayer("a", Config(config)).status().message(),
              HasSubstr("expected at most"));
  absl::Status device =
      engine->CreateLayer("a", Config(Params(4), "cuda:0")).status();
  EXPECT_EQ(device.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(device.message(), HasSubstr("device 'cuda:0' is not available"));
  LayerConfig unknown = Config(4);
  unknown.kind = "no_such_norm";
  absl::Status kind = engine->CreateLayer("a", unknown).status();
  EXPECT_EQ(kind.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(kind.message(), HasSubstr("unknown layer kind 'no_such_norm'; "
                                        "this server has batch_norm"));
  // Nothing was created by the failures.
  EXPECT_TRUE(engine->ListLayers(0, "")->layers.empty());
}

TEST(EngineTest, LayerLimit) {
  EngineOptions options;
  options.max_layers = 2;
  auto engine = MakeEngine(options);
  ASSERT_TRUE(engine->CreateLayer("a", Config(1)).ok());
  ASSERT_TRUE(engine->CreateLayer("b", Config(1)).ok());
  absl::Status full = engine->CreateLayer("c", Config(1)).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("--max_layers"));
}

TEST(EngineTest, ListPaginatesInNameOrder) {
  auto engine = MakeEngine();
  for (const char* id : {"e", "a", "d", "b", "c"}) {
    ASSERT_TRUE(engine->CreateLayer(id, Config(2)).ok());
  }
  std::vector<std::string> names;
  std::string token;
  int pages = 0;
  do {
    absl::StatusOr<ListLayersResult> page = engine->ListLayers(2, token);
    ASSERT_TRUE(page.ok());
    EXPECT_LE(page->layers.size(), 2u);
    for (const LayerInfo& info : page->layers) names.push_back(info.name);
    token = page->next_page_token;
    ++pages;
  } while (!token.empty() && pages < 10);
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(names, (std::vector<std::string>{"layers/a", "layers/b", "layers/c",
                                             "layers/d", "layers/e"}));
  EXPECT_EQ(engine->ListLayers(-1, "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, ListRejectsPageTokensItNeverIssued) {
  auto engine = MakeEngine();
  for (const char* id : {"a", "b", "c"}) {
    ASSERT_TRUE(engine->CreateLayer(id, Config(2)).ok());
    ASSERT_TRUE(engine->CreateLayer(id, Config(2), "t2").ok());
  }
  const std::string token = engine->ListLayers(1, "")->next_page_token;
  ASSERT_FALSE(token.empty());
  EXPECT_TRUE(engine->ListLayers(1, token).ok());
  // A bare id (what older servers issued), a forged tag, garbage, and a
  // token issued to another tenant: none resumes anything.
  for (const std::string& bad :
       {std::string("a"), std::string("a~0000000000000000"), std::string("~"),
        token + "x"}) {
    absl::Status status = engine->ListLayers(1, bad).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(status.message(), HasSubstr("was not issued by this server"));
  }
  EXPECT_EQ(engine->ListLayers(1, token, "t2").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Another engine (a restarted server) does not take this one's tokens.
  EXPECT_EQ(MakeEngine()->ListLayers(1, token).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, ServerChosenIdsTakeTheKindsPrefix) {
  auto engine = MakeEngine();
  absl::StatusOr<LayerInfo> info = engine->CreateLayer("", Config(2));
  ASSERT_TRUE(info.ok());
  EXPECT_THAT(info->name, ::testing::StartsWith("layers/bn-"));
}

TEST(EngineTest, RunOnLayerReportsUnknownAndDeletedLayers) {
  auto engine = MakeEngine();
  absl::Status seen;
  engine->RunOnLayer<int>(
      "nope", [](Layer&) -> absl::StatusOr<int> { return 1; },
      [&](absl::StatusOr<int> r) { seen = r.status(); });
  EXPECT_EQ(seen.code(), absl::StatusCode::kNotFound);

  ASSERT_TRUE(engine->CreateLayer("x", Config(2)).ok());
  absl::Notification release, first_done, second_done;
  absl::Status second;
  // Hold the strand so the second job is queued when the layer is deleted.
  engine->RunOnLayer<int>(
      "x",
      [&](Layer&) -> absl::StatusOr<int> {
        release.WaitForNotification();
        return 1;
      },
      [&](absl::StatusOr<int>) { first_done.Notify(); });
  engine->RunOnLayer<int>(
      "x", [](Layer&) -> absl::StatusOr<int> { return 2; },
      [&](absl::StatusOr<int> r) {
        second = r.status();
        second_done.Notify();
      });
  ASSERT_TRUE(engine->DeleteLayer("x").ok());
  release.Notify();
  first_done.WaitForNotification();
  second_done.WaitForNotification();
  EXPECT_EQ(second.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(second.message(), HasSubstr("was deleted"));
}

}  // namespace
}  // namespace normserve::server
