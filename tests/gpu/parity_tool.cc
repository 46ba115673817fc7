// normserve_parity: runs one BatchNorm case through a server layer
// (server/core, the code path of a real request, on the chosen device) and
// writes every result, for tests/gpu/parity_torch.py to compare with
// torch.nn.BatchNorm on CUDA and with a float64 reference.
//
//   normserve_parity --device cuda:0 --case CASE_FILE --out RESULT_FILE
//
// CASE_FILE: text lines "key value" up to a line "end", then raw
// little-endian arrays: x and dy (the dtype, memory order of the layout),
// weight and bias (float32, C each; only when affine is 1). Keys: dims
// (comma-separated logical shape N,C,...), layout (NCHW|NHWC), dtype
// (float32|float16|bfloat16), eps, momentum (a number or "none"), affine
// (0|1), steps (training forwards before the backward).
//
// The run: `steps` training forwards of x (stats returned), a backward of
// dy through the last one, then an eval forward of x.
//
// RESULT_FILE: lines "device NAME", then "array NAME DTYPE COUNT" per array,
// a line "end", then the arrays in that order: y_train, save_mean,
// save_invstd, dx, grad_weight, grad_bias, running_mean, running_var,
// y_eval.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "server/core/device.h"
#include "server/core/layers/batch_norm_layer.h"

namespace normserve::server {
namespace {

struct Case {
  std::vector<int64_t> dims;
  kernels::Layout layout = kernels::Layout::kNCHW;
  kernels::DType dtype = kernels::DType::kFloat32;
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;
  bool affine = true;
  int steps = 1;
  std::vector<uint8_t> x, dy;
  std::vector<float> weight, bias;
};

absl::StatusOr<Case> ReadCase(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  Case c;
  std::string line;
  while (std::getline(in, line) && line != "end") {
    std::vector<std::string> kv = absl::StrSplit(line, absl::MaxSplits(' ', 1));
    if (kv.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("bad line: ", line));
    }
    const std::string& key = kv[0];
    const std::string& value = kv[1];
    if (key == "dims") {
      for (absl::string_view d : absl::StrSplit(value, ',')) {
        int64_t v = 0;
        if (!absl::SimpleAtoi(d, &v)) {
          return absl::InvalidArgumentError(absl::StrCat("bad dims ", value));
        }
        c.dims.push_back(v);
      }
    } else if (key == "layout") {
      c.layout =
          value == "NHWC" ? kernels::Layout::kNHWC : kernels::Layout::kNCHW;
    } else if (key == "dtype") {
      c.dtype = value == "float16"    ? kernels::DType::kFloat16
                : value == "bfloat16" ? kernels::DType::kBFloat16
                                      : kernels::DType::kFloat32;
    } else if (key == "eps") {
      if (!absl::SimpleAtod(value, &c.eps)) {
        return absl::InvalidArgumentError("bad eps");
      }
    } else if (key == "momentum") {
      double m = 0;
      if (value == "none") {
        c.momentum.reset();
      } else if (absl::SimpleAtod(value, &m)) {
        c.momentum = m;
      } else {
        return absl::InvalidArgumentError("bad momentum");
      }
    } else if (key == "affine") {
      c.affine = value == "1";
    } else if (key == "steps") {
      if (!absl::SimpleAtoi(value, &c.steps) || c.steps < 1) {
        return absl::InvalidArgumentError("bad steps");
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown key ", key));
    }
  }
  if (c.dims.size() < 2) return absl::InvalidArgumentError("dims missing");
  size_t numel = 1;
  for (int64_t d : c.dims) numel *= static_cast<size_t>(d);
  const size_t bytes = numel * kernels::DTypeSize(c.dtype);
  c.x.resize(bytes);
  c.dy.resize(bytes);
  in.read(reinterpret_cast<char*>(c.x.data()), bytes);
  in.read(reinterpret_cast<char*>(c.dy.data()), bytes);
  if (c.affine) {
    c.weight.resize(c.dims[1]);
    c.bias.resize(c.dims[1]);
    in.read(reinterpret_cast<char*>(c.weight.data()), c.dims[1] * 4);
    in.read(reinterpret_cast<char*>(c.bias.data()), c.dims[1] * 4);
  }
  if (!in) return absl::InvalidArgumentError("case file is too short");
  return c;
}

TensorRef Ref(const Case& c, const std::vector<uint8_t>& bytes) {
  TensorRef t;
  t.data = bytes.data();
  t.bytes = bytes.size();
  t.dims = c.dims;
  t.layout = c.layout;
  t.dtype = c.dtype;
  return t;
}

OutputAllocator Into(std::vector<uint8_t>* out) {
  return [out](size_t bytes) -> void* {
    out->assign(bytes, 0xFF);
    return out->data();
  };
}

absl::Status Run(const std::string& device, const std::string& case_path,
                 const std::string& out_path) {
  ASSIGN_OR_RETURN(Case c, ReadCase(case_path));
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                   CreateBackend(device, 0));
  ContextStore contexts(16, size_t{16} << 30);
  BufferPool pool(backend.get(), size_t{16} << 30);
  BatchNormConfig config;
  config.num_features = c.dims[1];
  config.eps = c.eps;
  config.momentum = c.momentum;
  config.affine = c.affine;
  config.layout = c.layout;
  config.dtype = c.dtype;
  RETURN_IF_ERROR(ValidateConfig(config));
  LayerEnv env;
  env.backend = backend.get();
  env.contexts = &contexts;
  env.pool = &pool;
  BatchNormLayer layer("layers/parity", 1, config, env);
  if (c.affine) RETURN_IF_ERROR(layer.SetParameters(c.weight, c.bias).status());

  std::vector<uint8_t> y_train, dx, y_eval;
  ForwardResult last;
  for (int step = 0; step < c.steps; ++step) {
    ForwardArgs f;
    f.input = Ref(c, c.x);
    f.training = true;
    f.return_stats = true;
    f.output = Into(&y_train);
    ASSIGN_OR_RETURN(last, layer.Forward(f));
  }
  BackwardArgs b;
  b.handle = last.handle;
  b.grad_output = Ref(c, c.dy);
  b.grad_input = Into(&dx);
  ASSIGN_OR_RETURN(BackwardResult grads, layer.Backward(b));
  ASSIGN_OR_RETURN(StateDict state, layer.GetState(nullptr));
  ForwardArgs e;
  e.input = Ref(c, c.x);
  e.save_for_backward = false;
  e.output = Into(&y_eval);
  RETURN_IF_ERROR(layer.Forward(e).status());

  struct Array {
    std::string name;
    std::string dtype;
    const void* data;
    size_t count;
  };
  const std::string act = kernels::DTypeName(c.dtype);
  const size_t numel = y_train.size() / kernels::DTypeSize(c.dtype);
  auto floats = [](const std::string& name, const std::vector<float>& v) {
    return Array{name, "float32", v.data(), v.size()};
  };
  const std::vector<Array> arrays = {
      {"y_train", act, y_train.data(), numel},
      floats("save_mean", last.mean),
      floats("save_invstd", last.invstd),
      {"dx", act, dx.data(), numel},
      floats("grad_weight", grads.grad_weight),
      floats("grad_bias", grads.grad_bias),
      floats("running_mean", state["running_mean"].values),
      floats("running_var", state["running_var"].values),
      {"y_eval", act, y_eval.data(), numel},
  };
  std::ofstream out(out_path, std::ios::binary);
  if (!out) return absl::NotFoundError(absl::StrCat("cannot write ", out_path));
  out << "device " << backend->name() << "\n";
  for (const Array& a : arrays) {
    out << "array " << a.name << " " << a.dtype << " " << a.count << "\n";
  }
  out << "end\n";
  for (const Array& a : arrays) {
    const size_t elem = a.dtype == "float32" ? 4 : 2;
    out.write(static_cast<const char*>(a.data), a.count * elem);
  }
  if (!out) return absl::InternalError(absl::StrCat("writing ", out_path));
  return absl::OkStatus();
}

}  // namespace
}  // namespace normserve::server

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {{"--device", "auto"}};
  for (int i = 1; i + 1 < argc; i += 2) flags[argv[i]] = argv[i + 1];
  if (argc < 2 || std::string(argv[1]) == "--help" || !flags.count("--case") ||
      !flags.count("--out")) {
    std::fprintf(stderr,
                 "usage: normserve_parity [--device auto|cpu|cuda:N] "
                 "--case CASE_FILE --out RESULT_FILE\n");
    return argc >= 2 && std::string(argv[1]) == "--help" ? 0 : 2;
  }
  const absl::Status status = normserve::server::Run(
      flags["--device"], flags["--case"], flags["--out"]);
  if (!status.ok()) {
    std::fprintf(stderr, "normserve_parity: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
