#include "server/core/journal.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/layer_codec.h"
#include "server/core/layers/batch_norm_layer.h"

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

  static BatchNormConfig Params() {
    BatchNormConfig params;
    params.num_features = 2;
    return params;
  }

  static LayerInfo Info(uint64_t uid) {
    LayerInfo info;
    info.name = "layers/a";
    info.uid = uid;
    info.config = BatchNormLayerConfig(Params());
    return info;
  }

  static LayerState State(float value, int64_t version) {
    LayerState state{InitialState(BatchNormStateSpec(Params())), version};
    state.arrays.at("running_mean").values = {value, value};
    state.arrays.at("num_batches_tracked").int_value = version - 1;
    return state;
  }

  static std::vector<float> RunningMean(const RecoveredLayer& layer) {
    return layer.state.arrays.at("running_mean").values;
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
      LayerState state = State(v, v);
      ASSERT_TRUE((*journal)
                      ->LogMutation("", Info(1), &state, "", RequestResult())
                      .ok());
    }
    LayerState last = State(7, 5);
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
  EXPECT_EQ(RunningMean(layer), std::vector<float>({7, 7}));
  EXPECT_EQ(layer.config.kind, "batch_norm");
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
    LayerState first = State(1, 2), second = State(2, 3);
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
    LayerState late = State(3, 2);
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
      if (snapshot) {
        ASSERT_TRUE((*journal)->Snapshot().ok());
      }
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

// Appends raw frames to a copy's log, as a newer release might have.
void AppendFrames(const std::string& wal,
                  const std::vector<std::string>& payloads) {
  std::ofstream out(wal, std::ios::binary | std::ios::app);
  for (const std::string& payload : payloads) out << Frame(payload);
}

std::string Str(absl::string_view s) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  return std::string(reinterpret_cast<const char*>(&n), sizeof(n)) +
         std::string(s);
}

// A kPut record (type 1) for `name` carrying `blob`.
std::string PutRecord(uint64_t lsn, absl::string_view name,
                      absl::string_view blob) {
  std::string payload(1, '\x01');
  payload.append(reinterpret_cast<const char*>(&lsn), sizeof(lsn));
  payload += Str("") + Str(name);
  const uint64_t uid = 77;
  payload.append(reinterpret_cast<const char*>(&uid), sizeof(uid));
  payload += Str(blob) + Str("");
  payload.push_back(1);  // Result: kForward, version 2, 0 batches.
  const int64_t version = 2, batches = 0;
  payload.append(reinterpret_cast<const char*>(&version), sizeof(version));
  payload.append(reinterpret_cast<const char*>(&batches), sizeof(batches));
  return payload;
}

TEST_F(JournalTest, LayerEncodingRoundTripsEveryArray) {
  LayerState state = State(3.5f, 9);
  state.arrays.at("weight_momentum_buffer").values = {1, 2};
  state.arrays.at("bias_momentum_buffer").values = {3, 4};
  state.arrays.at("has_accumulated_grad").int_value = 1;
  const LayerConfig config = Info(1).config;
  const std::string blob =
      EncodeLayer(*BuiltinKinds().Find("batch_norm"), config, state);
  absl::StatusOr<DecodedLayer> decoded = DecodeLayer(BuiltinKinds(), blob);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->config.kind, "batch_norm");
  EXPECT_EQ(decoded->config.As<BatchNormConfig>()->num_features, 2);
  EXPECT_EQ(decoded->state.version, 9);
  EXPECT_EQ(decoded->state.arrays, state.arrays);
  // Every cut is damage, never a misread.
  for (size_t cut = 0; cut < blob.size(); ++cut) {
    EXPECT_FALSE(DecodeLayer(BuiltinKinds(), blob.substr(0, cut)).ok()) << cut;
  }
}

TEST_F(JournalTest, NewerFormatsAreKeptUnreadNotMisread) {
  const std::string good = EncodeLayer(*BuiltinKinds().Find("batch_norm"),
                                       Info(1).config, State(1, 2));
  std::string future_format = good;
  future_format[4] = 3;  // Layer format 3.
  std::string future_kind =
      "NSLR" + std::string("\x02\0\0\0", 4) + Str("batch_renorm");
  EXPECT_EQ(DecodeLayer(BuiltinKinds(), future_format).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(DecodeLayer(BuiltinKinds(), future_kind).status().code(),
            absl::StatusCode::kUnimplemented);
  {
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
  }
  // A newer release appended: a record type this one does not know, a
  // layer in a newer format, one of an unknown kind, then a good record.
  std::string unknown_type(1, '\x09');
  const uint64_t lsn = 100;
  unknown_type.append(reinterpret_cast<const char*>(&lsn), sizeof(lsn));
  unknown_type += "whatever comes next";
  AppendFrames(dir_ + "/wal.log",
               {unknown_type, PutRecord(101, "layers/f", future_format),
                PutRecord(102, "layers/g", future_kind),
                PutRecord(103, "layers/a", good)});
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "from the log" : "from the snapshot");
    auto journal = Journal::Open(Options(dir_));
    ASSERT_TRUE(journal.ok());
    ASSERT_EQ((*journal)->recovered().size(), 1u);
    EXPECT_EQ(RunningMean((*journal)->recovered()[0]),
              std::vector<float>({1, 1}))
        << "the record after the unknown ones replayed";
    const std::string report = absl::StrJoin((*journal)->report(), "\n");
    EXPECT_THAT(report, HasSubstr("layers/f (tenant '') is not served: layer "
                                  "state of format 3, written by a newer"));
    EXPECT_THAT(report, HasSubstr("layer kind 'batch_renorm' is not built"));
    if (round == 0) {
      EXPECT_THAT(report, HasSubstr("1 record(s) of a type this release does "
                                    "not know"));
    }
    EXPECT_THAT(report, HasSubstr("2 kept unread"));
    EXPECT_THAT(report, ::testing::Not(HasSubstr("cut")));
    std::vector<RecoveredLayer> layers = (*journal)->recovered();
    // Writes a snapshot in which the unread layers' bytes stay as they were.
    ASSERT_TRUE((*journal)->FinishRecovery({{&layers[0], 1}}).ok());
  }
}

TEST_F(JournalTest, AFailedAppendLeavesNothingBehind) {
  int fail = 0;
  JournalOptions options = Options(dir_);
  options.fail_for_test = [&fail](const char* step) {
    return std::string(step) == "append" ? fail : 0;
  };
  {
    auto journal = Journal::Open(options);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
    fail = ENOSPC;
    LayerState second = State(2, 2);
    absl::Status full = (*journal)->LogMutation(
        "", Info(1), &second, "r2", RequestResult{OpKind::kForward, 2, 1});
    EXPECT_EQ(full.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(full.message(), HasSubstr("state_dir " + dir_));
    EXPECT_THAT(full.message(), HasSubstr("No space left on device"));
    EXPECT_FALSE((*journal)->LookupRequest("", "layers/a", "r2").has_value())
        << "a request id is remembered only once its record is written";
    EXPECT_EQ((*journal)->LogDelete("", "layers/a", "d").code(),
              absl::StatusCode::kUnavailable);
    // Space is back: the same record goes in.
    fail = 0;
    ASSERT_TRUE((*journal)
                    ->LogMutation("", Info(1), &second, "r2",
                                  RequestResult{OpKind::kForward, 2, 1})
                    .ok());
    fs::remove_all(dir_ + "_copy");
    fs::copy(dir_, dir_ + "_copy");
  }
  auto journal = Journal::Open(Options(dir_ + "_copy"));
  ASSERT_TRUE(journal.ok());
  ASSERT_EQ((*journal)->recovered().size(), 1u) << "the delete never happened";
  EXPECT_EQ(RunningMean((*journal)->recovered()[0]),
            std::vector<float>({2, 2}));
  EXPECT_THAT((*journal)->report().front(), ::testing::Not(HasSubstr("WARN")));
  fs::remove_all(dir_ + "_copy");
}

TEST_F(JournalTest, AFailedFsyncStopsWritesUntilARestart) {
  int fail = 0;
  JournalOptions options = Options(dir_);
  options.fail_for_test = [&fail](const char* step) {
    return std::string(step) == "fsync" ? fail : 0;
  };
  {
    auto journal = Journal::Open(options);
    ASSERT_TRUE(journal.ok());
    ASSERT_TRUE((*journal)->FinishRecovery({}).ok());
    ASSERT_TRUE((*journal)->LogCreate("", Info(1), State(0, 1)).ok());
    fail = EIO;
    LayerState second = State(2, 2);
    absl::Status failed = (*journal)->LogMutation(
        "", Info(1), &second, "r2", RequestResult{OpKind::kForward, 2, 1});
    EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(failed.message(), HasSubstr("cannot fsync wal.log"));
    EXPECT_THAT(failed.message(), HasSubstr("until it is restarted"));
    // Even once fsync works again, nothing more is written...
    fail = 0;
    LayerState third = State(3, 3);
    EXPECT_EQ((*journal)
                  ->LogMutation("", Info(1), &third, "r3",
                                RequestResult{OpKind::kForward, 3, 2})
                  .code(),
              absl::StatusCode::kUnavailable);
    EXPECT_EQ((*journal)->Snapshot().code(), absl::StatusCode::kUnavailable);
  }
  // ...and a restart reads back what reached the disk (here: the record
  // whose fsync "failed" did), then takes writes again.
  auto journal = Journal::Open(Options(dir_));
  ASSERT_TRUE(journal.ok());
  ASSERT_EQ((*journal)->recovered().size(), 1u);
  EXPECT_EQ(RunningMean((*journal)->recovered()[0]),
            std::vector<float>({2, 2}));
  std::vector<RecoveredLayer> layers = (*journal)->recovered();
  ASSERT_TRUE((*journal)->FinishRecovery({{&layers[0], 1}}).ok());
  LayerState fourth = State(4, 4);
  EXPECT_TRUE((*journal)
                  ->LogMutation("", Info(1), &fourth, "r4",
                                RequestResult{OpKind::kForward, 4, 3})
                  .ok());
}

}  // namespace
}  // namespace normserve::server
