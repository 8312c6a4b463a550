"""Load on the service: many readers uploading at once, on loopback only.

Starts ``fetalscan serve`` as its own process on a free 127.0.0.1 port (nothing leaves
this machine), then:

- baseline: one client sends ``--baseline`` analyse requests one after the other
  (the service unloaded);
- ours under load: ``--clients`` concurrent clients (default 50) each send ``--requests``
  (default 20) analyse requests back to back, every request one real image.

Every request is ``POST /api/v1/analyze`` with the bearer token: the full path a reader's
upload takes (upload, checks, the one prediction path with the plane gate, Grad-CAM
heatmap, JSON). Printed: errors (the target is 0), latency p50/p95/max and throughput for
both, and the ratios. The service runs one study at a time through the models (CAM hooks
are per model), so under load the latency is mostly queueing: p95 ≈ clients × one
analysis. The figures depend on the machine and on what else runs on it.

    .venv/bin/python benchmarks/load.py [--model runs/demo/model.pt] [--clients 50] [--requests 20]
        [--baseline 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "fetal_brain_sample"


def _image() -> tuple[str, bytes]:
    picked = sorted(p for p in SAMPLE.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not picked:
        sys.exit(f"no sample image under {SAMPLE}")
    return picked[0].name, picked[0].read_bytes()


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _client(http, url: str, headers: dict, image: tuple[str, bytes], n: int,
                  latencies: list[float], errors: list[str]) -> None:
    name, data = image
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            r = await http.post(f"{url}/api/v1/analyze", headers=headers,
                                files={"files": (name, data, "application/octet-stream")})
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            elif abs(sum(r.json()["study"]["probabilities"].values()) - 1.0) > 1e-6:
                errors.append("study probabilities do not sum to 1")
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - t0)


async def _run(url: str, headers: dict, image, clients: int, requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, url, headers, image, requests, latencies, errors)
                               for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests, "errors": len(errors),
            "first_errors": errors[:3], "wall_s": wall, "throughput_rps": clients * requests / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * _percentile(latencies, 95),
            "max_ms": 1000 * max(latencies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "demo" / "model.pt")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--baseline", type=int, default=20, help="sequential requests of the one-client baseline")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run `make demo` first or pass --model")
    from fetalscan.serve.process import running_service

    image = _image()
    with tempfile.TemporaryDirectory() as tmp, running_service(args.model, Path(tmp)) as svc:
        headers = svc.headers()
        asyncio.run(_run(svc.url, headers, image, 1, 2))  # warm-up: first-call costs are not load
        base = asyncio.run(_run(svc.url, headers, image, 1, args.baseline))
        load = asyncio.run(_run(svc.url, headers, image, args.clients, args.requests))
    out = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}, "model": str(args.model),
           "image": image[0], "baseline": base, "ours": load,
           "ratio_throughput": load["throughput_rps"] / base["throughput_rps"],
           "ratio_p50": load["p50_ms"] / base["p50_ms"]}
    print(f"service load on loopback, model {args.model.name}, image {image[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':>26} {'requests':>9} {'errors':>7} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9} {'req/s':>7}")
    for label, r in (("baseline: 1 client", base), (f"ours: {args.clients} clients", load)):
        print(f"{label:>26} {r['requests']:>9} {r['errors']:>7} {r['p50_ms']:>9.0f} {r['p95_ms']:>9.0f} "
              f"{r['max_ms']:>9.0f} {r['throughput_rps']:>7.2f}")
    print(f"ratio (load / baseline): throughput {out['ratio_throughput']:.2f}x, p50 latency {out['ratio_p50']:.1f}x")
    for r in (base, load):
        for e in r["first_errors"]:
            print("error:", e)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    sys.exit(1 if base["errors"] or load["errors"] else 0)


if __name__ == "__main__":
    main()
