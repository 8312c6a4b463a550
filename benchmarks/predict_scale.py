"""Archive-scale prediction: peak memory at 1k and 10k images (flat) and throughput.

Generates ``--n`` (default 10,000) small PNG images (64 x 64 blobs, grey, in 100 sub-folders of a
temporary folder; the time this takes is printed), trains a tiny checkpoint on 24 others (a cached
head on MobileNetV3-Large with random weights, reading its input at 64 x 64 by default: the benchmark
measures the pipeline around the network, whose own cost ``benchmarks/inference.py`` measures;
``--backbone``, ``--input 0`` or ``--model`` for a real one), then runs
``fetalscan predict`` as a subprocess and samples its resident memory (psutil when installed,
else ``/proc/PID/status`` VmRSS, every 0.2 s, the process and its children):

- ours: the streamed path (a folder: ``fetalscan.inference.batch``), on the first 1,000 images
  and on all of them;
- baseline: the whole-list path of ``fetalscan predict`` (records loaded into one list, every
  row held in one DataFrame, both files written at the end), which a manifest CSV still takes;
  the same two sizes, listing the same files.

Printed: peak RSS at 1k and 10k images and its growth, and images per second (the wall time of
the command, start-up included). Flat memory: the streamed path's peak should not grow with the
number of images; the baseline's grows by its records and rows (small per image, so the gap
widens with the archive). The numbers depend on the machine and on what else runs on it.

    .venv/bin/python benchmarks/predict_scale.py [--n 10000] [--small 1000] [--model CKPT] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _image(k: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(k)
    img = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = 230 if k % 2 else 110
    return img


def generate(root: Path, n: int) -> tuple[list[Path], float]:
    """``n`` PNG files under ``root/dirNN/``; returns them (sorted) and the seconds it took."""
    from PIL import Image

    t0 = time.perf_counter()
    paths = []
    for k in range(n):
        p = root / f"dir{k % 100:02d}" / f"scan_{k:06d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(k)).save(p, compress_level=1)
        paths.append(p)
    return sorted(paths), time.perf_counter() - t0


def tiny_model(work: Path, backbone: str, side: int) -> Path:
    """A cached-head checkpoint (``backbone``, random weights unless SonoNet-16) trained on 24 labelled blobs,
    saved to read its input at ``side`` x ``side`` pixels (0 = the backbone's own input size)."""
    from dataclasses import replace

    from fetalscan.models.checkpoint import save_loaded

    from PIL import Image

    from fetalscan.api import Classifier

    rows = []
    for k in range(24):
        label = "abnormal" if k % 2 else "normal"
        p = work / "train" / label / f"t{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(10_000_000 + k)).save(p)
        rows.append({"path": str(p), "label": label, "group": f"{label}_{k // 4}"})
    manifest = work / "train" / "manifest.csv"
    _write_manifest(manifest, rows)
    pretrained = "sononet" if backbone == "sononet16" else "none"
    clf = Classifier(backbone=backbone, pretrained=pretrained, head_epochs=20, seed=0, device="cpu").fit(manifest)
    loaded = clf._loaded()
    if side:  # a cheaper network input: this benchmark measures the pipeline around the network
        loaded.preprocessing = replace(loaded.preprocessing, input_size=(side, side))
    return save_loaded(work / f"model_{backbone}_{side}.pt", loaded)


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (KiB)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) // 1024
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process ended between two samples
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def run_predict(model: Path, data: Path, out: Path, extra: list[str] | None = None) -> dict:
    """``fetalscan predict`` in a subprocess; its peak RSS (MiB), wall seconds and rows written."""
    cmd = [sys.executable, "-m", "fetalscan", "predict", "--model", str(model), "--data", str(data),
           "--out", str(out), "--no-progress", "--batch-size", "32", *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_kib(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"fetalscan predict failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    with open(out / "predictions.csv", newline="") as fh:
        rows = sum(1 for _ in fh) - 1
    return {"peak_rss_mib": round(peak[0] / 1024, 1), "seconds": round(wall, 1), "images": rows,
            "images_per_s": round(rows / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="images generated (default 10000)")
    ap.add_argument("--small", type=int, default=1000, help="the smaller run (default 1000)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: a tiny one trained here)")
    ap.add_argument("--backbone", default="mobilenetv3_large_100",
                    help="backbone of the tiny checkpoint (default: mobilenetv3_large_100, the fastest on a CPU)")
    ap.add_argument("--input", type=int, default=64,
                    help="network input side of the tiny checkpoint (default 64; 0 = the backbone's own, 224)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="fetalscan_scale_")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")
    big = work / "archive"
    paths, gen_s = generate(big, args.n)
    print(f"generated {args.n} PNG images (64 x 64) in {gen_s:.1f} s ({args.n / gen_s:.0f} images/s)")
    small = work / "archive_small"  # the first `small` files, hard links in the same tree layout
    for p in paths[: args.small]:
        q = small / p.relative_to(big)
        q.parent.mkdir(parents=True, exist_ok=True)
        if not q.exists():
            os.link(p, q)
    for name, files in (("small", paths[: args.small]), ("big", paths)):
        _write_manifest(work / f"{name}.csv", [{"path": str(p), "label": "", "group": p.stem} for p in files])
    model = args.model or tiny_model(work, args.backbone, args.input)
    print(f"model: {model}")
    results: dict = {"n_small": args.small, "n_big": args.n, "generation_s": round(gen_s, 1)}
    for label, data in (("ours", {"small": small, "big": big}),
                        ("baseline", {"small": work / "small.csv", "big": work / "big.csv"})):
        for size in ("small", "big"):
            out = work / f"out_{label}_{size}"
            r = run_predict(model, data[size], out, ["--overwrite"])
            results.setdefault(label, {})[size] = r
            print(f"{label:8s} {r['images']:>6d} images: peak RSS {r['peak_rss_mib']:7.1f} MiB, "
                  f"{r['seconds']:6.1f} s, {r['images_per_s']:6.1f} images/s")
    print()
    print(f"{'':10s}{'peak RSS @' + str(args.small):>16s}{'peak RSS @' + str(args.n):>18s}{'growth':>10s}"
          f"{'images/s @' + str(args.n):>18s}")
    for label in ("baseline", "ours"):
        s, b = results[label]["small"], results[label]["big"]
        growth = b["peak_rss_mib"] - s["peak_rss_mib"]
        results[label]["growth_mib"] = round(growth, 1)
        print(f"{label:10s}{s['peak_rss_mib']:>13.1f} MiB{b['peak_rss_mib']:>15.1f} MiB{growth:>+7.1f} MiB"
              f"{b['images_per_s']:>18.1f}")
    ratio = results["ours"]["big"]["images_per_s"] / max(results["baseline"]["big"]["images_per_s"], 1e-9)
    print(f"throughput ours / baseline at {args.n} images: {ratio:.2f}x")
    results["throughput_ratio"] = round(ratio, 3)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
