"""Decode and whole-step benchmark: Triton kernels vs the dense and sparse torch references.

    python benchmarks/kernels.py                 # the full sweep on a CUDA GPU (one command)
    python benchmarks/kernels.py --quick         # small shapes (CPU: torch paths only)

For each (L, d, F, k) it times the decode forward+backward and the whole CLT training step
(encode, TopK, decode, loss, backward, Adam) with decode = dense | sparse | triton, prints
ratios against the dense reference measured in the same run, peak memory, and the sparse
decode's achieved bandwidth (and the dense decode's FLOP rate) as a fraction of the device peak.
Results are appended to benchmarks/results/kernels.jsonl with the device and the commit.
Targets on an H100 (issue 3): sparse decode fwd+bwd ≥ 10× dense at F/k ≥ 512; whole step ≥ 3×
dense at GPT-2-small scale; peak memory of the step ≤ 1/3 of the dense step's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (L, d, F, k): GPT-2 small (L=12, d=768, F=24576, k=32) and SmolLM2-135M (L=30, d=576)
SWEEP = [
    (12, 768, 24576, 32),
    (12, 768, 24576, 64),
    (12, 768, 12288, 32),
    (30, 576, 18432, 32),
    (30, 576, 4608, 16),
    (4, 512, 16384, 16),
]
QUICK = [(4, 64, 1024, 8), (6, 96, 2048, 4)]
# peak dense fp32 (TF32 off) FLOP/s and memory bandwidth, by device name fragment
PEAKS = {"H100": (67e12, 3.35e12), "H200": (67e12, 4.8e12), "A100": (19.5e12, 2.0e12)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    sec = (time.perf_counter() - t) / reps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    return sec, peak


def bench_decode(L, d, F, k, n, impl, device, reps):
    from clt import kernels

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, L, F, device=device, generator=g)
    vals, idx = h.topk(k, dim=-1)
    a0 = torch.zeros_like(h).scatter(-1, idx, vals.abs())
    del h
    W = [
        torch.randn(F, L - s, d, device=device, generator=g).mul_(0.01).requires_grad_(True) for s in range(L)
    ]
    grad = torch.randn(n, L, d, device=device, generator=g)

    def step():
        a = a0.clone().requires_grad_(True)
        for w in W:
            w.grad = None
        kernels.decode(a, W, impl=impl).backward(grad)

    return timed(step, device, reps)


def bench_step(L, d, F, k, n, impl, device, reps):
    from clt.config import TrainConfig
    from clt.model import CLTArchitecture
    from clt.training import CLTModule

    cfg = TrainConfig()
    cfg.clt.d_sae, cfg.clt.k, cfg.clt.decode = F, k, impl
    m = CLTModule(cfg, CLTArchitecture(n_layers=L, d_model=d, d_sae=F, k=k)).to(device)
    x, y = torch.randn(n, L, d, device=device), torch.randn(n, L, d, device=device)
    m.initialize_from_data(x, y)
    opt = torch.optim.Adam(m.clt.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        m.loss(x, y)[0].backward()
        opt.step()

    return timed(step, device, reps)  # the module and optimizer are freed on return


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU: torch paths only)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-step", action="store_true", help="decode only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kernels.jsonl"))
    args = ap.parse_args()

    from clt import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print(
            "No CUDA device: the kernel benchmark targets a GPU. On a GPU machine run\n"
            "    python benchmarks/kernels.py\n"
            "Running --quick with the torch paths on CPU instead."
        )
        args.quick = True
    impls = ["dense", "sparse"] + (["triton"] if device == "cuda" and kernels.triton_available() else [])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    flops_peak, bw_peak = next((v for k_, v in PEAKS.items() if k_ in name), (float("nan"), float("nan")))
    n = 256 if args.quick else args.tokens
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"device: {name}   tokens/batch: {n}   commit: {commit}")
    print(
        f"{'L':>3} {'d':>4} {'F':>6} {'k':>3} | {'what':<7} {'impl':<7} {'ms':>9} {'×dense':>7} "
        f"{'peak GB':>8} {'util':>6}"
    )
    rows = []
    for L, d, F, k in QUICK if args.quick else SWEEP:
        pairs = L * (L + 1) // 2
        for what in ("decode", "step"):
            if what == "step" and args.no_step:
                continue
            base = None
            for impl in impls:
                fn = bench_decode if what == "decode" else bench_step
                try:
                    sec, peak = fn(L, d, F, k, n, impl, device, args.reps)
                except torch.cuda.OutOfMemoryError:
                    print(f"{L:3d} {d:4d} {F:6d} {k:3d} | {what:<7} {impl:<7} out of memory")
                    torch.cuda.empty_cache()
                    continue
                base = sec if impl == "dense" else base
                util = float("nan")
                if what == "decode" and impl == "dense":  # FLOP rate: fwd + 2 bwd matmuls
                    util = 3 * 2 * n * F * pairs * d / sec / flops_peak
                elif what == "decode":  # bandwidth: decoder rows read fwd + bwd(val) + bwd(W) writes
                    util = 3 * 4 * n * k * pairs * d / sec / bw_peak  # fp32 rows: n·k·Σ_s(L−s)·d
                ratio = base / sec if base else float("nan")
                print(
                    f"{L:3d} {d:4d} {F:6d} {k:3d} | {what:<7} {impl:<7} {sec * 1e3:9.2f} {ratio:7.2f} "
                    f"{peak / 1e9:8.2f} {util:6.1%}"
                )
                rows.append(
                    {
                        "L": L,
                        "d": d,
                        "F": F,
                        "k": k,
                        "tokens": n,
                        "what": what,
                        "impl": impl,
                        "seconds": sec,
                        "speedup_vs_dense": ratio,
                        "peak_bytes": peak,
                        "util": util,
                    }
                )
            if device == "cuda":
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(
            json.dumps(
                {
                    "device": name,
                    "commit": commit,
                    "date": time.strftime("%Y-%m-%d"),
                    "command": "python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
                    "rows": rows,
                }
            )
            + "\n"
        )
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
