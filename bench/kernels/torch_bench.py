#!/usr/bin/python3
"""PyTorch's CPU batch_norm on the same cases as normserve-kernel-bench.

usage: torch_bench.py [--threads 1,2] [--min_time_s 0.3] [--filter REGEX]
                      [--json OUT]

Times torch.nn.functional.batch_norm (training with the running-stat update,
and eval) and aten's native_batch_norm_backward (the kernel autograd calls,
without autograd's bookkeeping), and, for the kernel bench's "stats" case,
torch.var_mean over every axis but the channels (PyTorch 1.13's split
SyncBatchNorm ops, batch_norm_stats and the rest, have no CPU kernels, so
the other split cases have no PyTorch counterpart) on float32 32x64x56x56,
8x32x224x224, 256x2048x7x7 (contiguous = nchw and channels_last = nhwc)
and 4096x1024; and the row normalizations: torch.nn.functional.layer_norm
and aten's native_layer_norm_backward (dx, grad_weight, grad_bias), and,
for RMSNorm, which PyTorch 1.13 lacks, the composite
x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w and its autograd
backward (dx, grad_weight; labelled as such in the output), on float32
8192x768, 8192x4096 and 64x197x768 normalized over the last dimension
(layout "rows"); GroupNorm: torch.nn.functional.group_norm and aten's
native_group_norm_backward on 32x256x56x56 and 8x64x128x128 with 32 groups
(layout "g32"); InstanceNorm2d: torch.nn.functional.instance_norm (affine,
no running statistics) and, for its backward, aten's
native_batch_norm_backward on the (1, N*C, H, W) view, which is what
autograd runs for instance_norm (labelled), on 16x64x64x64; with
torch.set_num_threads(T). Case names match the kernel bench:
OP/SHAPE/LAYOUT/tT. Writes {"torch_version", "cases": {name: {"ms": mean
per call (as Google Benchmark reports), "min_ms", "iterations"[, "label":
what was timed when it is not PyTorch's own kernel]}}}. Uses Debian's python3-torch (/usr/bin/python3).
"""
import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("32x64x56x56", (32, 64, 56, 56)),
    ("8x32x224x224", (8, 32, 224, 224)),
    ("256x2048x7x7", (256, 2048, 7, 7)),
    ("4096x1024", (4096, 1024)),
]
OPS = ["forward_train", "forward_eval", "backward_train", "stats"]
ROW_SHAPES = [
    ("8192x768", (8192, 768)),
    ("8192x4096", (8192, 4096)),
    ("64x197x768", (64, 197, 768)),
]
ROW_OPS = ["layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
           "rms_norm_backward"]
CHANNEL_CASES = [
    # op, shape name, layout, shape, groups
    ("group_norm_forward", "32x256x56x56", "g32", (32, 256, 56, 56), 32),
    ("group_norm_backward", "32x256x56x56", "g32", (32, 256, 56, 56), 32),
    ("group_norm_forward", "8x64x128x128", "g32", (8, 64, 128, 128), 32),
    ("group_norm_backward", "8x64x128x128", "g32", (8, 64, 128, 128), 32),
    ("instance_norm_forward", "16x64x64x64", "nchw", (16, 64, 64, 64), 0),
    ("instance_norm_backward", "16x64x64x64", "nchw", (16, 64, 64, 64), 0),
]
INSTANCE_BACKWARD_LABEL = ("native_batch_norm_backward on the (1, N*C, H, W) "
                           "view (autograd's instance_norm backward)")
RMS_LABEL = "composite x*rsqrt(mean(x^2)+eps)*w (torch 1.13 has no RMSNorm)"


def time_case(fn, min_time_s):
    fn()  # Warm-up: first-touch of outputs, kernel selection.
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The mean, as Google Benchmark reports for the kernel bench.
    return sum(times) / len(times) * 1e3, min(times) * 1e3, len(times)


def make_case(op, shape, layout):
    c = shape[1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    w = torch.full((c,), 1.25)
    b = torch.full((c,), -0.5)
    rm = torch.zeros(c)
    rv = torch.ones(c)
    if op == "forward_train":
        return lambda: F.batch_norm(x, rm, rv, w, b, training=True,
                                    momentum=0.1, eps=1e-5)
    if op == "forward_eval":
        return lambda: F.batch_norm(x, rm, rv, w, b, training=False,
                                    eps=1e-5)
    if op == "stats":
        dims = [d for d in range(x.dim()) if d != 1]
        return lambda: torch.var_mean(x, dim=dims, unbiased=False)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, w, b, rm, rv, True, 0.1, 1e-5)
    return lambda: torch.ops.aten.native_batch_norm_backward(
        dy, x, w, rm, rv, save_mean, save_invstd, True, 1e-5,
        [True, True, True])


def make_row_case(op, shape):
    """Returns (fn, label or None)."""
    cols = shape[-1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    w = torch.full((cols,), 1.25)
    b = torch.full((cols,), -0.5)
    eps = 1e-5
    if op == "layer_norm_forward":
        return lambda: F.layer_norm(x, (cols,), w, b, eps), None
    if op == "layer_norm_backward":
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [cols], w, b, eps)
        return (lambda: torch.ops.aten.native_layer_norm_backward(
            dy, x, [cols], mean, rstd, w, b, [True, True, True]), None)

    def rms(xv, wv):
        return xv * torch.rsqrt(xv.pow(2).mean(-1, keepdim=True) + eps) * wv
    if op == "rms_norm_forward":
        return (lambda: rms(x, w)), RMS_LABEL
    # Backward: the graph is built once; each call runs autograd's backward
    # through it for dx and grad_weight (fresh tensors, no accumulation).
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)
        y = rms(xg, wg)

    def backward():
        with torch.enable_grad():
            return torch.autograd.grad(y, [xg, wg], dy, retain_graph=True)
    return backward, RMS_LABEL


def make_channel_case(op, shape, groups):
    """Returns (fn, label or None)."""
    n, c = shape[0], shape[1]
    hw = 1
    for d in shape[2:]:
        hw *= d
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    w = torch.full((c,), 1.25)
    b = torch.full((c,), -0.5)
    eps = 1e-5
    if op == "group_norm_forward":
        return lambda: F.group_norm(x, groups, w, b, eps), None
    if op == "group_norm_backward":
        _, mean, rstd = torch.ops.aten.native_group_norm(
            x, w, b, n, c, hw, groups, eps)
        return (lambda: torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, w, n, c, hw, groups, [True, True, True]),
            None)
    if op == "instance_norm_forward":
        return (lambda: F.instance_norm(x, weight=w, bias=b, eps=eps)), None
    xv = x.reshape(1, n * c, *shape[2:])
    dyv = dy.reshape(1, n * c, *shape[2:])
    wv = w.repeat(n)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        xv, wv, b.repeat(n), None, None, True, 0.1, eps)
    return (lambda: torch.ops.aten.native_batch_norm_backward(
        dyv, xv, wv, None, None, save_mean, save_invstd, True, eps,
        [True, True, True]), INSTANCE_BACKWARD_LABEL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default=None)
    parser.add_argument("--min_time_s", type=float, default=0.3)
    parser.add_argument("--filter", default="")
    parser.add_argument("--json")
    args = parser.parse_args()
    import os
    cores = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else sorted({1, cores}))
    pattern = re.compile(args.filter)
    cases = {}
    with torch.no_grad():
        for t in threads:
            torch.set_num_threads(t)
            for shape_name, shape in SHAPES:
                layouts = ["nchw", "nhwc"] if len(shape) == 4 else ["nc"]
                for layout in layouts:
                    for op in OPS:
                        name = f"{op}/{shape_name}/{layout}/t{t}"
                        if not pattern.search(name):
                            continue
                        fn = make_case(op, shape, layout)
                        ms, min_ms, n = time_case(fn, args.min_time_s)
                        cases[name] = {"ms": ms, "min_ms": min_ms,
                                       "iterations": n}
                        print(f"{name:40s} {ms:9.3f} ms", file=sys.stderr)
                        del fn
            for shape_name, shape in ROW_SHAPES:
                for op in ROW_OPS:
                    name = f"{op}/{shape_name}/rows/t{t}"
                    if not pattern.search(name):
                        continue
                    fn, label = make_row_case(op, shape)
                    ms, min_ms, n = time_case(fn, args.min_time_s)
                    cases[name] = {"ms": ms, "min_ms": min_ms,
                                   "iterations": n}
                    if label:
                        cases[name]["label"] = label
                    print(f"{name:40s} {ms:9.3f} ms", file=sys.stderr)
                    del fn
            for op, shape_name, layout, shape, groups in CHANNEL_CASES:
                name = f"{op}/{shape_name}/{layout}/t{t}"
                if not pattern.search(name):
                    continue
                fn, label = make_channel_case(op, shape, groups)
                ms, min_ms, n = time_case(fn, args.min_time_s)
                cases[name] = {"ms": ms, "min_ms": min_ms, "iterations": n}
                if label:
                    cases[name]["label"] = label
                print(f"{name:40s} {ms:9.3f} ms", file=sys.stderr)
                del fn
    out = {"torch_version": torch.__version__, "cases": cases}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    else:
        json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
