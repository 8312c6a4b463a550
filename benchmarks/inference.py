"""Classifier inference speed on the CPU: eager PyTorch as published code runs it vs our ONNX Runtime path.

For each model (SonoNet-16, ResNet34, DenseNet-169 and the fast model MobileNetV3-Large,
random weights: speed does not depend on them) at its registered input size:

- **FLOPs** per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` (multiply-add = 2);
- **baseline, eager**: ``model.eval()`` under ``torch.no_grad()`` with PyTorch's default
  threads, as the published training / evaluation scripts run it (normalisation included);
- **ours**: the graph the prediction path's ``backend="onnx"`` / ``"auto"`` runs
  (:func:`fetalscan.inference.onnx.cached_onnx`: normalisation inside the graph, ONNX Runtime
  with all graph optimisations, intra-op threads = physical cores), fed the prepared uint8 batch;
- images/s at batch 1, 8 and 32 (median of the repeats) and p50 / p95 latency at batch 1;
  baseline and ours alternate in short blocks, so both see the same machine load, and the first
  call of each block is not timed (both libraries' worker threads spin briefly after a call, so
  strictly interleaved single calls would time each engine against the other's threads);
- the machine's dense float32 matmul rate (GFLOP/s, ``torch.mm`` 2048 x 2048, best of 5) and the
  share of it each model reaches at batch 32.

    .venv/bin/python benchmarks/inference.py [--quick] [--json benchmarks/results/inference.json]

The machine is often shared: the load average before and after is printed and stored; read
the figures as upper bounds of the time when it is high.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("sononet16", "resnet34", "densenet169", "mobilenetv3_large_100")
FAST = "mobilenetv3_large_100"


def machine_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul rate of this machine with PyTorch's default threads (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def build(name: str):
    """A classifier as a checkpoint would hold it (random weights): SonoNet-16 with the demo's cached
    head and per-image normalisation; the others fine-tuned with their own linear head (the published way)."""
    from fetalscan.models.checkpoint import LoadedModel
    from fetalscan.models.heads import build_classifier
    from fetalscan.models.registry import get_backbone_spec

    torch.manual_seed(0)
    mode = "cached" if name == "sononet16" else "finetune"
    model = build_classifier(name, 4, mode=mode, pretrained="none").eval()
    arch = {"backbone": name, "num_classes": 4, "mode": mode, "head": "linear"}
    return LoadedModel(model, ["a", "b", "c", "d"], get_backbone_spec(name).preprocessing, arch, {})


def flops_per_image(loaded) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from fetalscan.inference.onnx import example_batch

    x = torch.from_numpy(example_batch(loaded.preprocessing, 1)).float()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.model(x)
    return float(counter.get_total_flops())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_model(name: str, batches: tuple[int, ...], repeats: int, latency_n: int, threads: int | None,
                int8: bool = False) -> dict:
    from fetalscan.data.transforms import normalize
    from fetalscan.inference.onnx import cached_onnx, example_batch, physical_cores

    loaded = build(name)
    pre = loaded.preprocessing
    t0 = time.perf_counter()
    engine = cached_onnx(loaded, None, threads=threads)  # what backend="onnx" makes (in memory here)
    export_s = time.perf_counter() - t0
    model = loaded.model
    qengine = None
    if int8:  # static int8 (QDQ), calibrated on synthetic images: for speed only (accuracy: fetalscan export --check)
        from fetalscan.inference.onnx import OnnxClassifier, export_onnx, quantize_onnx

        qengine = OnnxClassifier(quantize_onnx(export_onnx(loaded), "int8-static", example_batch(pre, 16, seed=5)),
                                 threads)

    def eager(x: torch.Tensor):
        with torch.no_grad():
            return model(normalize(x, pre))

    out: dict = {"flops_per_image": flops_per_image(loaded), "input_size": list(pre.input_size),
                 "export_s": round(export_s, 1), "ort_threads": threads or physical_cores(),
                 "torch_threads": torch.get_num_threads(), "batches": {}}
    for b in batches:
        xb = example_batch(pre, b, seed=b)
        xt = torch.from_numpy(xb)
        eager(xt), engine.logits(xb, b)  # warm-up
        te, to = [], []
        for _ in range(repeats):  # each timed call follows one untimed call of the same engine (see below)
            eager(xt)
            te.append(_timed(lambda: eager(xt)))
            engine.logits(xb, b)
            to.append(_timed(lambda: engine.logits(xb, b)))
        out["batches"][str(b)] = {"eager_ips": b / statistics.median(te), "ours_ips": b / statistics.median(to)}
        if qengine is not None:
            qengine.logits(xb, b)
            out["batches"][str(b)]["ours_int8_ips"] = b / statistics.median(
                [_timed(lambda: qengine.logits(xb, b)) for _ in range(repeats)])
    x1 = example_batch(pre, 1, seed=7)
    x1t = torch.from_numpy(x1)
    le, lo = [], []
    # blocks of calls, alternating: PyTorch's and ONNX Runtime's worker threads keep spinning for a
    # moment after a call, so strictly alternating single calls would time each one against the
    # other's spinning threads; the first call of each block is not counted
    block = max(2, latency_n // 5)
    for _ in range(5):
        for fn, sink in ((lambda: eager(x1t), le), (lambda: engine.logits(x1, 1), lo)):
            fn()
            sink.extend(_timed(fn) * 1000 for _ in range(block))
    out["eager_b1_p50_ms"], out["eager_b1_p95_ms"] = float(np.percentile(le, 50)), float(np.percentile(le, 95))
    out["ours_b1_p50_ms"], out["ours_b1_p95_ms"] = float(np.percentile(lo, 50)), float(np.percentile(lo, 95))
    if qengine is not None:
        lq = [_timed(lambda: qengine.logits(x1, 1)) * 1000 for _ in range(latency_n)]
        out["ours_int8_b1_p95_ms"] = float(np.percentile(lq, 95))
    top = str(max(batches))
    out["eager_b32_ips"] = out["batches"][top]["eager_ips"]
    out["ours_b32_ips"] = out["batches"][top]["ours_ips"]
    out["ratio_b32"] = out["ours_b32_ips"] / out["eager_b32_ips"]
    if qengine is not None:
        out["ours_int8_b32_ips"] = out["batches"][top]["ours_int8_ips"]
        out["ratio_int8_b32"] = out["ours_int8_b32_ips"] / out["eager_b32_ips"]
    out["largest_batch"] = int(top)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="a small run: 2 repeats, 10 latency samples")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: physical cores)")
    p.add_argument("--int8", action="store_true", help="also time the static-int8 graph (fetalscan export "
                   "--quantize int8-static; opt-in because it changes outputs)")
    args = p.parse_args(argv)
    repeats, latency_n = (2, 10) if args.quick else (5, 50)
    batches = (1, 8, 32)
    load_before = os.getloadavg()
    gflops = machine_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}; dense float32 matmul {gflops:.1f} GFLOP/s; load average {load_before[0]:.2f}")
    models = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench_model(name, batches, repeats, latency_n, args.threads, args.int8)
        r["flop_share_b32"] = r["flops_per_image"] * r["ours_b32_ips"] / (gflops * 1e9)
        r["eager_flop_share_b32"] = r["flops_per_image"] * r["eager_b32_ips"] / (gflops * 1e9)
        r["fast_model"] = name == FAST
        models[name] = r
        print(f"\n{name} ({r['flops_per_image'] / 1e9:.2f} GFLOP/image at {r['input_size'][0]}x{r['input_size'][1]}; "
              f"export + check {r['export_s']} s)")
        print(f"  {'batch':>5} {'eager img/s':>12} {'ours img/s':>11} {'ratio':>6}"
              + (f" {'int8 img/s':>11} {'ratio':>6}" if args.int8 else ""))
        for b, v in r["batches"].items():
            print(f"  {b:>5} {v['eager_ips']:>12.1f} {v['ours_ips']:>11.1f} {v['ours_ips'] / v['eager_ips']:>6.2f}"
                  + (f" {v['ours_int8_ips']:>11.1f} {v['ours_int8_ips'] / v['eager_ips']:>6.2f}" if args.int8 else ""))
        print(f"  batch 1 latency: eager p50 {r['eager_b1_p50_ms']:.1f} ms p95 {r['eager_b1_p95_ms']:.1f} ms; "
              f"ours p50 {r['ours_b1_p50_ms']:.1f} ms p95 {r['ours_b1_p95_ms']:.1f} ms"
              + (f"; int8 p95 {r['ours_int8_b1_p95_ms']:.1f} ms" if args.int8 else ""))
        print(f"  share of the machine's matmul rate at batch 32: eager {r['eager_flop_share_b32']:.1%}, "
              f"ours {r['flop_share_b32']:.1%}")
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores shared with other jobs: "
          "figures are noisy)")
    print("targets: fast model >= 5x eager at batch 32 and p95 <= 6 ms at batch 1; published backbones >= 1.7x")
    for name, r in models.items():
        goal = 5.0 if r["fast_model"] else 1.7
        extra = f", p95 {r['ours_b1_p95_ms']:.1f} ms {'met' if r['ours_b1_p95_ms'] <= 6 else 'MISSED'}" \
            if r["fast_model"] else ""
        print(f"  {name}: {r['ratio_b32']:.2f}x at batch 32 ({'met' if r['ratio_b32'] >= goal else 'MISSED'} "
              f">= {goal}x){extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"machine": {"gflops": gflops, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "load_average_before": load_before, "load_average_after": load_after,
                           "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                           "quick": args.quick},
               "models": models}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
