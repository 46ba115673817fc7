#include "server/core/journal.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::server {
namespace {

namespace fs = std::filesystem;
using journal_format::Crc32c;
using journal_format::Frame;
using journal_format::ReadFrames;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST(JournalFormatTest, Crc32cMatchesTheStandardCheckValue) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(""), 0u);
}

TEST(JournalFormatTest, FramesRoundTrip) {
  const std::string data = Frame("one") + Frame("") + Frame("three");
  journal_format::Frames frames = ReadFrames(data, false);
  EXPECT_THAT(frames.payloads, ::testing::ElementsAre("one", "", "three"));
  EXPECT_EQ(frames.valid_bytes, data.size());
  EXPECT_THAT(frames.error, IsEmpty());
}

TEST(JournalFormatTest, TornTailEndsAtTheLastWholeFrame) {
  const std::string good = Frame("first") + Frame("second");
  const std::string data = good + Frame("third");
  for (size_t cut = good.size() + 1; cut < data.size(); ++cut) {
    journal_format::Frames frames = ReadFrames(data.substr(0, cut), false);
    EXPECT_EQ(frames.payloads.size(), 2u) << cut;
    EXPECT_EQ(frames.valid_bytes, good.size()) << cut;
    EXPECT_THAT(frames.error, Not(IsEmpty())) << cut;
  }
}

TEST(JournalFormatTest, BadChecksumStopsOrIsSkipped) {
  std::string data = Frame("first") + Frame("second") + Frame("third");
  data[Frame("first").size() + 8 + 2] ^= 0x01;  // Inside "second".
  journal_format::Frames stop = ReadFrames(data, false);
  EXPECT_THAT(stop.payloads, ::testing::ElementsAre("first"));
  EXPECT_THAT(stop.error, HasSubstr("checksum mismatch"));
  journal_format::Frames skip = ReadFrames(data, true);
  EXPECT_THAT(skip.payloads, ::testing::ElementsAre("first", "third"));
  EXPECT_EQ(skip.skipped, 1u);
}

TEST(JournalFormatTest, ImpossibleLengthEnds) {
  std::string data = Frame("first") + Frame("second");
  data[Frame("first").size() + 3] = '\x7f';  // Length's top byte.
  journal_format::Frames frames = ReadFrames(data, true);
  EXPECT_THAT(frames.payloads, ::testing::ElementsAre("first"));
  EXPECT_THAT(frames.error, HasSubstr("past the end"));
}

class JournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() /
            ("journal_test_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  JournalOptions Options(const std::string& dir) {
    JournalOptions options;
    options.dir = dir;
    return options;
  }

  static LayerInfo Info(uint64_t uid) {
    LayerInfo info;
    info.name = "layers/a";
    info.uid = uid;
    info.config.num_features = 2;
    return info;
  }

  static DurableLayerState State(float value, int64_t version) {
    DurableLayerState state = InitialDurableState(Info(1).config);
    state.running_mean = {value, value};
    state.num_batches_tracked = version - 1;
    state.version = version;
    return state;
  }

  // Copies the directory as a crash would leave it (the journal still open).
  std::string CrashCopy() {
    const std::string copy = dir_ + "_crash";
    fs::remove_all(copy);
    fs::copy(dir_, copy);
    return copy;
  }

  std::string dir_;
};

TEST_F(JournalTest, RestoresTheLastStateAndRequestIds) {
  std::string crashed;
  {
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok()) << journal.status();
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
    for (int v = 2; v <= 4; ++v) {
      DurableLayerState state = State(v, v);
      ASSERT_TRUE((*journal)
                      ->LogMutation("", Info(1), &state, "", RequestResult())
                      .ok());
    }
    DurableLayerState last = State(7, 5);
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), &last, "rid-5",
                                  RequestResult{OpKind::kSetParameters, 5, 4})
                    .ok());
    crashed = CrashCopy();
  }
  auto journal = Journal::Open(Options(crashed));
  ASSERT_TRUE(journal.ok());
  ASSERT_EQ((*journal)->recovered().size(), 1u);
  const RecoveredLayer& layer = (*journal)->recovered()[0];
  EXPECT_EQ(layer.name, "layers/a");
  EXPECT_EQ(layer.state.version, 5);
  EXPECT_EQ(layer.state.running_mean, std::vector<float>({7, 7}));
  std::vector<RecoveredLayer> layers = (*journal)->recovered();
  ASSERT_TRUE((*journal)->FinishRecovery({{&layers[0], 9}}).ok());
  std::optional<RequestResult> prior =
      (*journal)->LookupRequest("", "layers/a", "rid-5");
  ASSERT_TRUE(prior.has_value());
  EXPECT_EQ(prior->version, 5);
  EXPECT_EQ(prior->kind, OpKind::kSetParameters);
  EXPECT_FALSE((*journal)->LookupRequest("", "layers/a", "other").has_value());
  EXPECT_FALSE((*journal)->LookupRequest("t", "layers/a", "rid-5").has_value());
  fs::remove_all(crashed);
}

TEST_F(JournalTest, TornLogTailIsCutWithAWarning) {
  std::string crashed;
  {
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    DurableLayerState first = State(1, 2), second = State(2, 3);
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), &first, "r1",
                                  RequestResult{OpKind::kForward, 2, 1})
                    .ok());
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), &second, "r2",
                                  RequestResult{OpKind::kForward, 3, 2})
                    .ok());
    crashed = CrashCopy();
  }
  const std::string wal = crashed + "/wal.log";
  fs::resize_file(wal, fs::file_size(wal) - 5);
  auto journal = Journal::Open(Options(crashed));
  ASSERT_TRUE(journal.ok());
  ASSERT_EQ((*journal)->recovered().size(), 1u);
  EXPECT_EQ((*journal)->recovered()[0].state.version, 2);
  EXPECT_THAT((*journal)->report().front(), HasSubstr("WARNING"));
  EXPECT_THAT((*journal)->report().front(), HasSubstr("cut"));
  std::vector<RecoveredLayer> layers = (*journal)->recovered();
  ASSERT_TRUE((*journal)->FinishRecovery({{&layers[0], 1}}).ok());
  EXPECT_TRUE((*journal)->LookupRequest("", "layers/a", "r1").has_value());
  EXPECT_FALSE((*journal)->LookupRequest("", "layers/a", "r2").has_value());
  fs::remove_all(crashed);
}

TEST_F(JournalTest, DeletedLayerStaysDeleted) {
  {
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
    ASSERT_TRUE((*journal)->LogDelete("", "layers/a").ok());
    // A mutation of the deleted layer that finished after the delete.
    DurableLayerState late = State(3, 2);
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), &late, "",
                                  RequestResult{OpKind::kForward, 2, 1})
                    .ok());
  }
  auto journal = Journal::Open(Options(dir_));
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), IsEmpty());
}

// Deleted layers are remembered up to a bound: a late mutation of one of
// the last max_dead_layers is dropped, of an older one it is logged again.
TEST_F(JournalTest, DeletedLayersAreRememberedUpToABound) {
  JournalOptions options;  // In memory: the entries are what counts.
  options.max_dead_layers = 2;
  auto journal = Journal::Open(options);
  ASSERT_TRUE(journal.ok());
  auto info = [](uint64_t uid) {
    LayerInfo i = Info(uid);
    i.name = "layers/l" + std::to_string(uid);
    return i;
  };
  auto late_mutation_kept = [&](uint64_t uid) {
    const std::string id = "late" + std::to_string(uid);
    EXPECT_TRUE((*journal)
                    ->LogMutation("", info(uid), nullptr, id,
                                  RequestResult{OpKind::kForward, 3, 1})
                    .ok());
    return (*journal)->LookupRequest("", info(uid).name, id).has_value();
  };
  for (uint64_t uid = 1; uid <= 3; ++uid) {
    ASSERT_TRUE((*journal)
                    ->LogMutation("", info(uid), nullptr, "",
                                  RequestResult{OpKind::kForward, 2, 1})
                    .ok());
    ASSERT_TRUE((*journal)->LogDelete("", info(uid).name).ok());
  }
  EXPECT_FALSE(late_mutation_kept(3));
  EXPECT_FALSE(late_mutation_kept(2));
  EXPECT_TRUE(late_mutation_kept(1));  // Forgotten: beyond the bound.
}

TEST_F(JournalTest, RequestIdsAreBoundedPerLayer) {
  JournalOptions options;  // In memory.
  options.max_request_ids = 3;
  auto journal = Journal::Open(options);
  ASSERT_TRUE(journal.ok());
  EXPECT_FALSE((*journal)->durable());
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), nullptr, "r" + std::to_string(i),
                                  RequestResult{OpKind::kForward, i + 2, 0})
                    .ok());
  }
  EXPECT_FALSE((*journal)->LookupRequest("", "layers/a", "r1").has_value());
  EXPECT_TRUE((*journal)->LookupRequest("", "layers/a", "r2").has_value());
  EXPECT_TRUE((*journal)->LookupRequest("", "layers/a", "r4").has_value());
}

// Returns the recorded result of a create/delete id, claiming (and
// releasing) it when there is none.
std::optional<LifecycleResult> Lifecycle(Journal& journal,
                                         absl::string_view tenant,
                                         absl::string_view id) {
  absl::StatusOr<std::optional<LifecycleResult>> found =
      journal.ClaimLifecycle(tenant, id);
  EXPECT_TRUE(found.ok()) << found.status();
  if (!found.ok()) return std::nullopt;
  if (!found->has_value()) journal.ReleaseLifecycle(tenant, id);
  return *found;
}

TEST_F(JournalTest, CreateAndDeleteIdsSurviveRestartsAndSnapshots) {
  for (bool snapshot : {false, true}) {
    SCOPED_TRACE(snapshot ? "from the snapshot" : "from the log");
    fs::remove_all(dir_);
    {
      auto journal = Journal::Open(Options(dir_));
      ASSERT_TRUE(journal.ok());
      ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
      ASSERT_TRUE((*journal)->LogCreate("t", Info(1), State(0, 1), "c1").ok());
      ASSERT_TRUE((*journal)->LogDelete("t", "layers/a", "d1").ok());
      // Re-created under the same name by another create.
      ASSERT_TRUE((*journal)->LogCreate("t", Info(2), State(0, 1), "c2").ok());
      if (snapshot) ASSERT_TRUE((*journal)->Snapshot().ok());
      // A crash: the directory as it is now, the journal still open.
      fs::remove_all(dir_ + "_copy");
      fs::copy(dir_, dir_ + "_copy");
    }
    auto journal = Journal::Open(Options(dir_ + "_copy"));
    ASSERT_TRUE(journal.ok());
    ASSERT_EQ((*journal)->recovered().size(), 1u);
    std::vector<RecoveredLayer> layers = (*journal)->recovered();
    ASSERT_TRUE((*journal)->FinishRecovery({{&layers[0], 5}}).ok());

    std::optional<LifecycleResult> c1 = Lifecycle(**journal, "t", "c1");
    ASSERT_TRUE(c1.has_value());
    EXPECT_EQ(c1->kind, OpKind::kCreateLayer);
    EXPECT_EQ(c1->name, "layers/a");
    EXPECT_TRUE(c1->gone) << "its layer was deleted; the live one is c2's";
    std::optional<LifecycleResult> d1 = Lifecycle(**journal, "t", "d1");
    ASSERT_TRUE(d1.has_value());
    EXPECT_EQ(d1->kind, OpKind::kDeleteLayer);
    EXPECT_EQ(d1->name, "layers/a");
    std::optional<LifecycleResult> c2 = Lifecycle(**journal, "t", "c2");
    ASSERT_TRUE(c2.has_value());
    EXPECT_FALSE(c2->gone);
    // Per tenant, and not a layer's id.
    EXPECT_FALSE(Lifecycle(**journal, "", "c1").has_value());
    EXPECT_FALSE((*journal)->LookupRequest("t", "layers/a", "c2").has_value());
    fs::remove_all(dir_ + "_copy");
  }
}

TEST_F(JournalTest, LifecycleClaimsAreExclusive) {
  JournalOptions options;  // In memory.
  auto journal = Journal::Open(options);
  ASSERT_TRUE(journal.ok());
  auto first = (*journal)->ClaimLifecycle("", "r");
  ASSERT_TRUE(first.ok());
  EXPECT_FALSE(first->has_value());
  auto second = (*journal)->ClaimLifecycle("", "r");
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("still being applied"));
  EXPECT_TRUE((*journal)->ClaimLifecycle("other", "r").ok());
  ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1), "r").ok());
  (*journal)->ReleaseLifecycle("", "r");
  auto after = (*journal)->ClaimLifecycle("", "r");
  ASSERT_TRUE(after.ok());
  ASSERT_TRUE(after->has_value());
  EXPECT_EQ((*after)->name, "layers/a");
}

TEST_F(JournalTest, LifecycleIdsAreBoundedPerTenant) {
  JournalOptions options;  // In memory.
  options.max_request_ids = 3;
  auto journal = Journal::Open(options);
  ASSERT_TRUE(journal.ok());
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(
        (*journal)->LogDelete("", "layers/a", "d" + std::to_string(i)).ok());
  }
  EXPECT_FALSE(Lifecycle(**journal, "", "d1").has_value());
  EXPECT_TRUE(Lifecycle(**journal, "", "d2").has_value());
  EXPECT_TRUE(Lifecycle(**journal, "", "d4").has_value());
}

// A delete record as servers before request ids on DeleteLayer wrote it
// (no id after the name) still replays.
TEST_F(JournalTest, DeleteRecordWithoutRequestIdReplays) {
  {
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
    fs::remove_all(dir_ + "_copy");
    fs::copy(dir_, dir_ + "_copy");
  }
  std::string payload;
  payload.push_back(2);  // kDelete.
  const uint64_t lsn = 1000;
  payload.append(reinterpret_cast<const char*>(&lsn), sizeof(lsn));
  for (absl::string_view s :
       {absl::string_view(""), absl::string_view("layers/a")}) {
    const uint32_t n = static_cast<uint32_t>(s.size());
    payload.append(reinterpret_cast<const char*>(&n), sizeof(n));
    payload.append(s.data(), s.size());
  }
  {
    std::ofstream wal(dir_ + "_copy/wal.log", std::ios::binary | std::ios::app);
    wal << Frame(payload);
  }
  auto journal = Journal::Open(Options(dir_ + "_copy"));
  ASSERT_TRUE(journal.ok());
  EXPECT_THAT((*journal)->recovered(), IsEmpty());
  EXPECT_THAT((*journal)->report().front(), ::testing::Not(HasSubstr("WARN")));
  fs::remove_all(dir_ + "_copy");
}

}  // namespace
}  // namespace normserve::server
