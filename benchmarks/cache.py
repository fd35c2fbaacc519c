"""Activation cache against online generation, on the demo config by default.

    python benchmarks/cache.py                      # demo config: SmolLM2-135M, SOTU, 16,384 tokens
    python benchmarks/cache.py --tokens 65536 --train-steps 0

Measures, in one run on this machine:
  - online generation (subject forward + shuffle buffer): tokens/s;
  - cache write (the same forward passes + bf16 shards + checksums): tokens/s, MB/s;
  - cache read (global order, checksums verified): tokens/s, MB/s — the file was just written, so
    this is a warm page cache (a cold read is bounded by the disk's MB/s);
  - int8 storage: size against bf16, its quantisation error as FVU, and the held-out FVU of the
    same CLT trained on the bf16 cache and on the int8 cache (same batches, same seed).
Prints ratios against online generation; appends to benchmarks/results/cache.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens generated / cached / read")
    ap.add_argument(
        "--train-steps", type=int, default=60, help="CLT steps on each cache for the int8 FVU check"
    )
    ap.add_argument("--dir", default=None, help="where to write the caches (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache.jsonl"))
    args = ap.parse_args()

    from throughput import compose

    from clt.config import CacheConfig, CacheJobConfig
    from clt.data import ActivationSource
    from clt.data.activation_cache import CachedActivations, generate
    from clt.metrics import reconstruction_stats
    from clt.subject import load_subject
    from clt.training import CLTModule, clt_architecture

    cfg = compose(args.overrides)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    subject = load_subject(cfg.model)
    B, n = cfg.trainer.batch_tokens, args.tokens
    root = Path(args.dir or tempfile.mkdtemp(prefix="clt-cache-bench-"))
    res: dict = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": cfg.model.name_or_path,
        "layers": subject.n_layers,
        "d_model": subject.d_model,
        "context": cfg.data.context_size,
        "tokens": n,
        "batch_tokens": B,
    }

    # 1. online: the training source's batches (generation + shuffle), n tokens
    online = ActivationSource(subject, cfg.data, B, cfg.seed)
    t = time.perf_counter()
    got = 0
    for x, _, _ in online.batches():
        got += x.shape[0]
        if got >= n:
            break
    res["online_tok_s"] = got / (time.perf_counter() - t)

    # 2. cache write, bf16 and int8
    for dtype in ("bfloat16", "int8"):
        d = root / dtype
        shutil.rmtree(d, ignore_errors=True)
        job = CacheJobConfig(
            model=cfg.model,
            data=cfg.data,
            cache=CacheConfig(
                dir=str(d), tokens=n, shard_tokens=max(n // 4, 1), dtype=dtype, task=0, tasks=1
            ),
        ).validate()
        t = time.perf_counter()
        m = generate(subject, job, progress=False)
        dt = time.perf_counter() - t
        size = sum(s["bytes"] for s in m["shards"])
        res[f"write_{dtype}_tok_s"], res[f"write_{dtype}_MB_s"] = m["tokens"] / dt, size / dt / 1e6
        res[f"{dtype}_bytes_per_token"] = size / m["tokens"]

    # 3. cache read (global order, checksums verified once per shard)
    for dtype in ("bfloat16", "int8"):
        src = CachedActivations(subject, replace(cfg.data, cache=str(root / dtype)), B, cfg.seed, cfg.model)
        t, got = time.perf_counter(), 0
        for x, _, _ in src.batches():
            got += x.shape[0]
            if got >= n - B:
                break
        dt = time.perf_counter() - t
        res[f"read_{dtype}_tok_s"] = got / dt
        res[f"read_{dtype}_MB_s"] = got * res[f"{dtype}_bytes_per_token"] / dt / 1e6

    # 4. int8: quantisation error, and the CLT trained on each cache
    def fvu(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum()).item()

    srcs = {
        dt: CachedActivations(
            subject, replace(cfg.data, cache=str(root / dt), cache_order="stream"), B, cfg.seed, cfg.model
        )
        for dt in ("bfloat16", "int8")
    }
    (xb, yb), (xq, yq) = (srcs[dt].first_activations(4) for dt in ("bfloat16", "int8"))
    res["int8_quant_fvu_x"], res["int8_quant_fvu_y"] = fvu(xq, xb), fvu(yq, yb)
    if args.train_steps:
        eval_x, eval_y = online.activations(online.eval_windows())  # held out, fp32, not cached
        arch = clt_architecture(cfg, subject)
        for dt, src in srcs.items():
            torch.manual_seed(cfg.seed)
            module = CLTModule(replace(cfg, data=replace(cfg.data, cache=str(root / dt))), arch)
            module.initialize_from_data(*src.first_activations(cfg.data.norm_batches))
            opt = torch.optim.Adam(module.clt.parameters(), lr=cfg.optim.lr)
            for _, (x, y, _) in zip(range(args.train_steps), src.batches()):
                total, _ = module.loss(x, y)
                opt.zero_grad()
                total.backward()
                opt.step()
            with torch.no_grad():
                stats = reconstruction_stats(module.clt, eval_x, eval_y)
            res[f"trained_{dt}_heldout_fvu"] = stats["fvu"].mean().item()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    on = res["online_tok_s"]
    print(
        f"\n{cfg.model.name_or_path}: {subject.n_layers} layers × d={subject.d_model}, {n} tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  online generation        {on:10.0f} tok/s   1.00×")
    for dt in ("bfloat16", "int8"):
        print(
            f"  cache write {dt:9s}    {res[f'write_{dt}_tok_s']:10.0f} tok/s   "
            f"{res[f'write_{dt}_tok_s'] / on:5.2f}×"
            f"   {res[f'write_{dt}_MB_s']:7.1f} MB/s   {res[f'{dt}_bytes_per_token'] / 1e3:.1f} kB/token"
        )
    for dt in ("bfloat16", "int8"):
        print(
            f"  cache read  {dt:9s}    {res[f'read_{dt}_tok_s']:10.0f} tok/s   "
            f"{res[f'read_{dt}_tok_s'] / on:5.1f}×"
            f"   {res[f'read_{dt}_MB_s']:7.1f} MB/s (warm page cache)"
        )
    print(
        f"  int8 size / bf16 size    {res['int8_bytes_per_token'] / res['bfloat16_bytes_per_token']:.3f}; "
        f"quantisation FVU x {res['int8_quant_fvu_x']:.2e}, y {res['int8_quant_fvu_y']:.2e}"
    )
    if args.train_steps:
        print(
            f"  CLT after {args.train_steps} steps, held-out FVU: trained on bf16 "
            f"{res['trained_bfloat16_heldout_fvu']:.4f}, "
            f"on int8 {res['trained_int8_heldout_fvu']:.4f} "
            f"(ratio {res['trained_int8_heldout_fvu'] / res['trained_bfloat16_heldout_fvu']:.4f})"
        )
    res["train_steps"] = args.train_steps
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
