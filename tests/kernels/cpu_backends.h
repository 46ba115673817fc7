// The CPU backends every CPU kernel test runs on: generic and
// auto-detected kernels; one thread, and three threads with every problem
// split (min_elements_per_task = 1); and the production defaults. Made once
// per test binary and shared by its tests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/batch_norm_cpu.h"

namespace normserve::kernels::test_util {

struct BackendUnderTest {
  std::string name;
  CpuIsa isa;
  std::unique_ptr<Backend> backend;
};

inline std::vector<BackendUnderTest>& CpuBackendsUnderTest() {
  static auto* backends = [] {
    auto* v = new std::vector<BackendUnderTest>;
    struct Config {
      CpuIsa isa;
      int threads;
      int64_t min_elements_per_task;
    };
    for (const Config& c :
         {Config{CpuIsa::kGeneric, 1, 1 << 16}, Config{CpuIsa::kGeneric, 3, 1},
          Config{CpuIsa::kAuto, 1, 1 << 16}, Config{CpuIsa::kAuto, 3, 1},
          Config{CpuIsa::kAuto, 0, 1 << 16}}) {
      CpuBackendOptions options;
      options.num_threads = c.threads;
      CpuBackendTuning tuning;
      tuning.isa = c.isa;
      tuning.min_elements_per_task = c.min_elements_per_task;
      std::unique_ptr<Backend> b = CreateCpuBackendWithTuning(options, tuning);
      std::string name =
          absl::StrCat(b->name(), " split every ", c.min_elements_per_task);
      v->push_back({std::move(name), c.isa, std::move(b)});
    }
    return v;
  }();
  return *backends;
}

}  // namespace normserve::kernels::test_util
