#!/usr/bin/env python3
"""Parity of normserve's BatchNorm (through a server layer, on a device) with
torch.nn.BatchNorm{1,2,3}d on CUDA, both against a float64 reference.

For each case it draws fresh random inputs, writes them for normserve_parity
(tests/gpu/parity_tool.cc), runs it, and runs the same steps in PyTorch:
`steps` training forwards, a backward through the last one, an eval forward.
For each output it reports the relative error ||out - ref|| / ||ref|| of
normserve and of PyTorch-on-CUDA against PyTorch in float64 on the CPU (fed
the same dtype-rounded inputs). A case passes when every normserve error is
within its dtype's tolerance or within 2x PyTorch's own error.

  parity_torch.py --tool BUNDLE/bin/normserve_parity [--device cuda:0]
                  [--json OUT.json]
  parity_torch.py --selftest --tool .../normserve_parity --device cpu

--selftest needs no PyTorch: one tiny case against a pure-Python float64
reference, to check the plumbing where there is no GPU.
Exit status: 0 all passed, 1 a case failed, 2 usage or setup error.
"""

import argparse
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

DTYPE_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Relative-norm tolerances per activation dtype; per-channel float32
# results (statistics, parameter gradients) use FLOAT_TOL.
ACT_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
FLOAT_TOL = 1e-4
OUTPUTS = ["y_train", "save_mean", "save_invstd", "dx", "grad_weight",
           "grad_bias", "running_mean", "running_var", "y_eval"]

# (dims, layout, dtype, momentum, steps)
CASES = [
    ((8, 32, 56, 56), "NCHW", "float32", 0.1, 3),
    ((8, 32, 56, 56), "NHWC", "float32", 0.1, 3),
    ((8, 32, 56, 56), "NCHW", "bfloat16", 0.1, 2),
    ((8, 32, 56, 56), "NHWC", "bfloat16", 0.1, 2),
    ((16, 64, 28, 28), "NHWC", "float16", None, 3),
    ((64, 512, 7, 7), "NCHW", "float32", 0.1, 2),
    ((2, 3, 150, 151), "NCHW", "float32", 0.1, 2),
    ((512, 1024), "NCHW", "float32", 0.1, 2),
    ((512, 1024), "NCHW", "bfloat16", 0.1, 2),
    ((4, 8, 6, 10, 12), "NHWC", "float32", 0.05, 2),
    ((16, 24, 100), "NCHW", "float32", 0.1, 2),
]


def write_case(path, dims, layout, dtype, eps, momentum, steps, x_bytes,
               dy_bytes, weight, bias):
    with open(path, "wb") as f:
        header = [
            "dims " + ",".join(str(d) for d in dims),
            "layout " + layout,
            "dtype " + dtype,
            "eps %r" % eps,
            "momentum " + ("none" if momentum is None else repr(momentum)),
            "affine 1",
            "steps %d" % steps,
            "end",
        ]
        f.write(("\n".join(header) + "\n").encode())
        f.write(x_bytes)
        f.write(dy_bytes)
        f.write(struct.pack("<%df" % len(weight), *weight))
        f.write(struct.pack("<%df" % len(bias), *bias))


def read_result(path):
    """Returns (device name, {name: (dtype, count, bytes)})."""
    with open(path, "rb") as f:
        data = f.read()
    arrays, order, device = {}, [], ""
    pos = 0
    while True:
        end = data.index(b"\n", pos)
        line = data[pos:end].decode()
        pos = end + 1
        if line == "end":
            break
        if line.startswith("device "):
            device = line[len("device "):]
        else:
            _, name, dtype, count = line.split()
            order.append((name, dtype, int(count)))
    for name, dtype, count in order:
        size = count * DTYPE_SIZE[dtype]
        arrays[name] = (dtype, count, data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise ValueError("%s: %d trailing bytes" % (path, len(data) - pos))
    return device, arrays


def run_tool(tool, device, case_path, out_path):
    proc = subprocess.run(
        [tool, "--device", device, "--case", case_path, "--out", out_path],
        capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("normserve_parity failed (%d): %s" %
                           (proc.returncode, proc.stderr.strip()))


def rel_err(a, ref):
    """||a - ref|| / ||ref|| over flat sequences of floats."""
    num = sum((x - y) ** 2 for x, y in zip(a, ref))
    den = sum(y * y for y in ref)
    if any(math.isnan(x) for x in a):
        return float("inf")
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


# ---------------------------------------------------------------------------
# With PyTorch (the GPU machine).

def torch_case(torch, tool, device, dims, layout, dtype, momentum, steps, tmp,
               eps=1e-5):
    import numpy as np
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
    c = dims[1]
    rank = len(dims)
    gen = torch.Generator().manual_seed(hash((dims, layout, dtype)) & 0xffff)
    mean = torch.rand(c, generator=gen, dtype=torch.float64) * 4 - 2
    scale = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    shape_c = [1, c] + [1] * (rank - 2)
    x64 = (torch.randn(dims, generator=gen, dtype=torch.float64) *
           scale.view(shape_c) + mean.view(shape_c))
    dy64 = torch.randn(dims, generator=gen, dtype=torch.float64)
    x = x64.to(torch_dtype)   # What every side sees: the rounded values.
    dy = dy64.to(torch_dtype)
    weight = (torch.rand(c, generator=gen) + 0.5).float()
    bias = torch.randn(c, generator=gen).float()

    # Memory order for the layout: NHWC puts channels last.
    perm = [0] + list(range(2, rank)) + [1]
    inv = [0, rank - 1] + list(range(1, rank - 1))

    def to_bytes(t):
        t = t.permute(perm) if layout == "NHWC" else t
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().tobytes()
        return t.numpy().tobytes()

    def from_bytes(raw, dt):
        if dt == "float32":
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
        elif dt == "float16":
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy())
        else:
            t = torch.from_numpy(
                np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
        return t.double()

    case_path = os.path.join(tmp, "case.bin")
    out_path = os.path.join(tmp, "out.bin")
    write_case(case_path, dims, layout, dtype, eps, momentum, steps,
               to_bytes(x), to_bytes(dy), weight.tolist(), bias.tolist())
    t0 = time.time()
    run_tool(tool, device, case_path, out_path)
    tool_s = time.time() - t0
    ours_device, arrays = read_result(out_path)
    ours = {}
    mem_dims = [dims[i] for i in perm] if layout == "NHWC" else list(dims)
    for name, (dt, count, raw) in arrays.items():
        t = from_bytes(raw, dt)
        if count == x.numel():
            t = t.view(mem_dims)
            t = t.permute(inv) if layout == "NHWC" else t
        ours[name] = t

    module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
              4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[rank]

    def run_torch(dev, compute_dtype, memory_format):
        bn = module(c, eps=eps, momentum=momentum).to(dev)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        if compute_dtype == torch.float64:
            bn = bn.double()
        xin = x.to(dev).to(compute_dtype)
        if memory_format is not None:
            xin = xin.contiguous(memory_format=memory_format)
        out = {}
        bn.train()
        for step in range(steps):
            xs = xin.detach().clone().requires_grad_(step == steps - 1)
            y = bn(xs)
        var, mean_b = torch.var_mean(xin.double().transpose(0, 1).reshape(c, -1),
                                     dim=1, correction=0)
        out["save_mean"] = mean_b
        out["save_invstd"] = 1.0 / torch.sqrt(var + eps)
        out["y_train"] = y.detach().double()
        y.backward(dy.to(dev).to(compute_dtype))
        out["dx"] = xs.grad.double()
        out["grad_weight"] = bn.weight.grad.double()
        out["grad_bias"] = bn.bias.grad.double()
        out["running_mean"] = bn.running_mean.double()
        out["running_var"] = bn.running_var.double()
        bn.eval()
        with torch.no_grad():
            out["y_eval"] = bn(xin).double()
        return {k: v.detach().cpu().flatten() for k, v in out.items()}

    fmt = None
    if layout == "NHWC" and rank == 4:
        fmt = torch.channels_last
    elif layout == "NHWC" and rank == 5:
        fmt = torch.channels_last_3d
    ref = run_torch("cpu", torch.float64, None)
    theirs = run_torch("cuda", torch_dtype, fmt)
    rows = []
    ok = True
    for name in OUTPUTS:
        a = ours[name].flatten()
        r = ref[name]
        num = torch.linalg.vector_norm(a - r).item()
        den = torch.linalg.vector_norm(r).item()
        e_ours = num / den if den > 0 else num
        if torch.isnan(a).any():
            e_ours = float("inf")
        # PyTorch's save_mean/invstd are not exposed; they are our reference.
        e_torch = None
        if name not in ("save_mean", "save_invstd"):
            t = theirs[name]
            e_torch = torch.linalg.vector_norm(t - r).item() / den if den > 0 \
                else torch.linalg.vector_norm(t - r).item()
        tol = ACT_TOL[dtype] if name in ("y_train", "dx", "y_eval") \
            else FLOAT_TOL
        passed = e_ours <= tol or (e_torch is not None and
                                   e_ours <= 2 * e_torch + 1e-12)
        ok = ok and passed
        rows.append({"output": name, "ours": e_ours, "torch_cuda": e_torch,
                     "tolerance": tol, "pass": passed})
    return {"dims": list(dims), "layout": layout, "dtype": dtype,
            "momentum": momentum, "steps": steps, "device": ours_device,
            "tool_seconds": round(tool_s, 3), "pass": ok, "errors": rows}


# ---------------------------------------------------------------------------
# Without PyTorch: a pure-Python float64 reference for a tiny case.

def py_reference(dims, layout, x, dy, weight, bias, eps, momentum, steps):
    n, c = dims[0], dims[1]
    s = 1
    for d in dims[2:]:
        s *= d

    def idx(i, ch, j):
        return (i * c + ch) * s + j if layout == "NCHW" else (i * s + j) * c + ch

    count = n * s
    out = {k: [0.0] * (len(x) if k in ("y_train", "dx", "y_eval") else c)
           for k in OUTPUTS}
    rm, rv = [0.0] * c, [1.0] * c
    for ch in range(c):
        vals = [x[idx(i, ch, j)] for i in range(n) for j in range(s)]
        mean = sum(vals) / count
        var = sum((v - mean) ** 2 for v in vals) / count
        invstd = 1.0 / math.sqrt(var + eps)
        for step in range(steps):
            m = momentum if momentum is not None else 1.0 / (step + 1)
            rm[ch] = (1 - m) * rm[ch] + m * mean
            rv[ch] = (1 - m) * rv[ch] + m * var * count / (count - 1)
        out["save_mean"][ch] = mean
        out["save_invstd"][ch] = invstd
        out["running_mean"][ch] = rm[ch]
        out["running_var"][ch] = rv[ch]
        sdy = sum(dy[idx(i, ch, j)] for i in range(n) for j in range(s))
        sdyx = sum(dy[idx(i, ch, j)] * (x[idx(i, ch, j)] - mean)
                   for i in range(n) for j in range(s))
        out["grad_bias"][ch] = sdy
        out["grad_weight"][ch] = sdyx * invstd
        eval_invstd = 1.0 / math.sqrt(rv[ch] + eps)
        for i in range(n):
            for j in range(s):
                k = idx(i, ch, j)
                out["y_train"][k] = (x[k] - mean) * invstd * weight[ch] + bias[ch]
                out["dx"][k] = ((dy[k] - sdy / count -
                                 (x[k] - mean) * invstd * invstd * sdyx / count)
                                * invstd * weight[ch])
                out["y_eval"][k] = ((x[k] - rm[ch]) * eval_invstd * weight[ch]
                                    + bias[ch])
    return out


def selftest(tool, device):
    dims, layout, momentum, steps, eps = (2, 3, 4, 5), "NHWC", None, 3, 1e-5
    rng = random.Random(5)
    numel = 2 * 3 * 4 * 5
    x = [struct.unpack("<f", struct.pack("<f", rng.gauss(1.0, 2.0)))[0]
         for _ in range(numel)]
    dy = [struct.unpack("<f", struct.pack("<f", rng.gauss(0.0, 1.0)))[0]
          for _ in range(numel)]
    weight = [0.5, 1.0, 1.5]
    bias = [0.25, -0.5, 0.0]
    ref = py_reference(dims, layout, x, dy, weight, bias, eps, momentum, steps)
    with tempfile.TemporaryDirectory() as tmp:
        case_path = os.path.join(tmp, "case.bin")
        out_path = os.path.join(tmp, "out.bin")
        write_case(case_path, dims, layout, "float32", eps, momentum, steps,
                   struct.pack("<%df" % numel, *x),
                   struct.pack("<%df" % numel, *dy), weight, bias)
        run_tool(tool, device, case_path, out_path)
        ours_device, arrays = read_result(out_path)
    ok = True
    rows = []
    for name in OUTPUTS:
        dtype, count, raw = arrays[name]
        got = list(struct.unpack("<%df" % count, raw))
        e = rel_err(got, ref[name])
        passed = e <= 1e-5
        ok = ok and passed
        rows.append({"output": name, "ours": e, "torch_cuda": None,
                     "tolerance": 1e-5, "pass": passed})
    return {"dims": list(dims), "layout": layout, "dtype": "float32",
            "momentum": momentum, "steps": steps, "device": ours_device,
            "pass": ok, "errors": rows, "reference": "pure Python float64"}


def print_table(results):
    print("%-18s %-4s %-8s %-12s %10s %10s %9s %s" %
          ("shape", "lay", "dtype", "output", "normserve", "torch_cuda",
           "tol", "ok"))
    for r in results:
        if "error" in r:
            print("%-18s %-4s %-8s ERROR %s" % ("x".join(map(str, r["dims"])),
                                               r["layout"], r["dtype"],
                                               r["error"]))
            continue
        for e in r["errors"]:
            print("%-18s %-4s %-8s %-12s %10.2e %10s %9.0e %s" % (
                "x".join(map(str, r["dims"])), r["layout"], r["dtype"],
                e["output"], e["ours"],
                "-" if e["torch_cuda"] is None else "%.2e" % e["torch_cuda"],
                e["tolerance"], "ok" if e["pass"] else "FAIL"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tool", required=True, help="normserve_parity binary")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--selftest", action="store_true",
                   help="no PyTorch: one tiny case, pure-Python reference")
    args = p.parse_args()
    if not os.access(args.tool, os.X_OK):
        print("parity_torch.py: %s is not executable" % args.tool,
              file=sys.stderr)
        return 2
    results = []
    if args.selftest:
        results.append(selftest(args.tool, args.device))
        meta = {"mode": "selftest"}
    else:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            print("parity_torch.py: PyTorch is needed (%s); --selftest runs "
                  "without it" % e, file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("parity_torch.py: torch.cuda is not available",
                  file=sys.stderr)
            return 2
        meta = {"mode": "torch", "torch": torch.__version__,
                "torch_device": torch.cuda.get_device_name(0),
                "cudnn": torch.backends.cudnn.version()}
        with tempfile.TemporaryDirectory() as tmp:
            for dims, layout, dtype, momentum, steps in CASES:
                try:
                    results.append(torch_case(torch, args.tool, args.device,
                                              dims, layout, dtype, momentum,
                                              steps, tmp))
                except Exception as e:  # Report and go on to the next case.
                    results.append({"dims": list(dims), "layout": layout,
                                    "dtype": dtype, "pass": False,
                                    "error": "%s: %s" % (type(e).__name__, e)})
    print_table(results)
    passed = all(r["pass"] for r in results)
    print("parity: %d/%d cases passed" %
          (sum(r["pass"] for r in results), len(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cases": results, "pass": passed}, f,
                      indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
