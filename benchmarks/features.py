"""The feature-card pass against the bare CLT encoder over the same tokens (ratios in one run).

    python benchmarks/features.py                    # demo config: SmolLM2-135M, random F = 512 CLT
    python benchmarks/features.py --tokens 32768 --device cuda

Measures, on this machine:
  1. from an activation cache (written here first, bf16): tokens/s of the card pass (encoder +
     statistics + top-k + samples) against the bare encoder (`encode_layer` for every layer) over
     the same batches; goal ≥ 0.7;
  2. online (the subject's forward pass included in both): the same ratio;
  3. memory: peak RSS of a card pass over N and 10·N tokens of a synthetic cache (a child process
     each), and the accumulator's own state; flat = independent of N;
  4. cost against F on the synthetic cache: the ratio at F = 256, 1024, 4096.
Appends one JSON line to benchmarks/results/features.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
# the repo first, then benchmarks/ (for throughput.py)
sys.path = (
    [str(REPO)]
    + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
    + [str(REPO / "benchmarks")]
)


def bare_pass(clt, source, n_windows: int, bw: int, dev) -> float:
    """Seconds for the encoder alone over the batches of `source`."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in source.batches(0, n_windows, bw, None):
            x = b.x.to(dev)
            for layer in range(clt.n_layers):
                a = clt.encode_layer(x[:, layer], layer)
            if dev != "cpu":
                torch.cuda.synchronize()
    del a
    return time.perf_counter() - t0


def card_pass(clt, source, f, dev, work: Path) -> tuple[float, int]:
    """Seconds for the card pass (no resume points inside the timing) and the state's bytes."""
    from clt.features.pipeline import accumulator, scan_batch

    n_windows = -(-f.tokens // source.per)
    acc = accumulator(clt, f, None, dev)
    t0 = time.perf_counter()
    for b in source.batches(0, n_windows, f.batch_windows, None):
        scan_batch(acc, clt, b, source.per, 0.0)
    if dev != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, acc.memory_bytes()


def synthetic_cache(root: Path, L: int, d: int, tokens: int, per: int = 127, seed: int = 0) -> Path:
    """A cache of random activations (no subject model): the memory and F measurements."""
    from clt.config import DataConfig, ModelConfig
    from clt.data.activation_cache import finalize, make_plan, write_or_check_plan, write_shard

    sub = SimpleNamespace(family_name="llama", dtype=torch.bfloat16, n_layers=L, d_model=d)
    plan = make_plan(
        sub,
        ModelConfig(name_or_path="synthetic"),
        DataConfig(context_size=per + 1),
        tokens,
        64 * per,
        "bfloat16",
    )
    write_or_check_plan(root, plan)
    g = torch.Generator().manual_seed(seed)
    for s in range(plan["n_shards"]):
        w0, w1 = s * plan["shard_windows"], min((s + 1) * plan["shard_windows"], plan["n_windows"])
        n = (w1 - w0) * per
        x = torch.randn(n, L, d, generator=g)
        wins = torch.randint(0, 1000, (w1 - w0, per + 1), generator=g)
        docs = (torch.arange(w0, w1)[:, None] // 4).expand(-1, per + 1)
        write_shard(root, s, w0, wins, docs, x, torch.zeros(n, L, 1), "bfloat16")
    finalize(root)
    return root


def child(args) -> None:
    """One card pass over a synthetic cache; prints peak RSS (kB) and the state's bytes."""
    from clt.config import DataConfig, FeaturesConfig, ModelConfig
    from clt.features.pipeline import CacheSource
    from clt.model import CLTArchitecture, CrossLayerTranscoder

    torch.manual_seed(0)
    arch = CLTArchitecture(
        n_layers=args.layers,
        d_model=args.d,
        d_sae=args.child_f,
        activation="topk",
        k=16,
        subject_model="synthetic",
    )
    clt = CrossLayerTranscoder(arch).eval()
    data = DataConfig(context_size=128, cache=args.child)
    source = CacheSource(data, ModelConfig(name_or_path="synthetic"), clt)
    f = FeaturesConfig(checkpoint="-", tokens=args.child_tokens, batch_windows=8)
    if args.child_bare:
        secs = bare_pass(clt, source, -(-f.tokens // source.per), f.batch_windows, "cpu")
        state = 0
    else:
        secs, state = card_pass(clt, source, f, "cpu", Path(tempfile.mkdtemp()))
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    print(json.dumps({"hwm_kb": hwm, "state_bytes": state, "seconds": secs}))


def run_child(cache: Path, tokens: int, F: int, args, bare: bool = False) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(cache),
        "--child-tokens",
        str(tokens),
        "--child-f",
        str(F),
        "--layers",
        str(args.layers),
        "--d",
        str(args.d),
    ] + (["--child-bare"] if bare else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for train.py (the subject, the CLT size)"
    )
    ap.add_argument("--tokens", type=int, default=32768, help="tokens of the cache / online passes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mem-tokens", type=int, default=16384, help="N of the memory test (and 10·N)")
    ap.add_argument("--layers", type=int, default=4, help="synthetic cache: layers")
    ap.add_argument("--d", type=int, default=128, help="synthetic cache: width")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "features.jsonl"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-f", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-bare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from throughput import compose

    from clt.config import CacheConfig, CacheJobConfig, FeaturesConfig
    from clt.data.activation_cache import generate
    from clt.features.pipeline import CacheSource, OnlineSource
    from clt.model import CLTArchitecture, CrossLayerTranscoder
    from clt.subject import load_subject

    cfg = compose(args.overrides)
    dev = args.device
    subject = load_subject(cfg.model, dev)
    torch.manual_seed(0)
    arch = CLTArchitecture(
        n_layers=subject.n_layers,
        d_model=subject.d_model,
        d_sae=cfg.clt.d_sae,
        activation=cfg.clt.activation,
        k=cfg.clt.k,
        subject_model=cfg.model.name_or_path,
    )
    clt = CrossLayerTranscoder(arch).to(dev).eval()
    f = FeaturesConfig(checkpoint="-", tokens=args.tokens, batch_windows=cfg.data.batch_windows)
    tmp = Path(tempfile.mkdtemp(prefix="clt-features-bench-"))
    res: dict = {
        "device": torch.cuda.get_device_name()
        if dev.startswith("cuda")
        else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "subject": cfg.model.name_or_path,
        "L": arch.n_layers,
        "d": arch.d_model,
        "F": arch.d_sae,
        "activation": arch.activation,
        "tokens": args.tokens,
        "date": time.strftime("%Y-%m-%d"),
    }

    # 1. from a cache
    cache = tmp / "cache"
    generate(
        subject,
        CacheJobConfig(
            model=cfg.model,
            data=cfg.data,
            cache=CacheConfig(dir=str(cache), tokens=args.tokens, shard_tokens=4096, task=0, tasks=1),
        ).validate(),
        progress=False,
    )
    data = replace(cfg.data, cache=str(cache))
    src = CacheSource(data, cfg.model, clt)
    n_windows = -(-args.tokens // src.per)
    bare_pass(clt, src, n_windows, f.batch_windows, dev)  # warm-up: every shard read and checksummed once
    bare = bare_pass(clt, src, n_windows, f.batch_windows, dev)
    cards, state = card_pass(clt, src, f, dev, tmp)
    n = n_windows * src.per
    res["cache"] = {
        "bare_tok_s": n / bare,
        "cards_tok_s": n / cards,
        "ratio": bare / cards,
        "state_mib": state / 2**20,
    }
    print(
        f"from a cache: encoder {n / bare:,.0f} tok/s, card pass {n / cards:,.0f} tok/s: ratio "
        f"{bare / cards:.2f}"
    )

    # 2. online (the subject's forward pass in both)
    online = OnlineSource(cfg.data, subject)
    bare_pass(clt, online, 2, f.batch_windows, dev)  # warm-up: the dataset opened, the first forward
    bare = bare_pass(clt, online, n_windows, f.batch_windows, dev)
    cards, _ = card_pass(clt, online, f, dev, tmp)
    res["online"] = {"bare_tok_s": n / bare, "cards_tok_s": n / cards, "ratio": bare / cards}
    print(
        f"online: subject + encoder {n / bare:,.0f} tok/s, card pass {n / cards:,.0f} tok/s: ratio "
        f"{bare / cards:.2f}"
    )

    # 3. memory flat in N (synthetic cache, child processes)
    N = args.mem_tokens
    syn = synthetic_cache(tmp / "synthetic", args.layers, args.d, 10 * N)
    mem = {str(t): run_child(syn, t, 1024, args) for t in (N, 10 * N)}
    base = run_child(syn, N, 1024, args, bare=True)
    res["memory"] = {
        "F": 1024,
        "L": args.layers,
        "d": args.d,
        "bare_hwm_mib": base["hwm_kb"] / 1024,
        **{t: {"hwm_mib": m["hwm_kb"] / 1024, "state_mib": m["state_bytes"] / 2**20} for t, m in mem.items()},
    }
    a, b = mem[str(N)]["hwm_kb"] / 1024, mem[str(10 * N)]["hwm_kb"] / 1024
    print(
        f"memory (L={args.layers}, d={args.d}, F=1024): peak RSS {a:.0f} MiB over {N:,} tokens, "
        f"{b:.0f} MiB over {10 * N:,} ({b / a:.2f}×); "
        f"state {mem[str(N)]['state_bytes'] / 2**20:.1f} MiB; bare encoder {base['hwm_kb'] / 1024:.0f} MiB"
    )

    # 4. cost against F
    res["by_F"] = {}
    for F in (256, 1024, 4096):
        c = run_child(syn, N, F, args)
        e = run_child(syn, N, F, args, bare=True)
        res["by_F"][str(F)] = {
            "ratio": e["seconds"] / c["seconds"],
            "cards_tok_s": N / c["seconds"],
            "state_mib": c["state_bytes"] / 2**20,
        }
        print(
            f"F = {F}: card pass {N / c['seconds']:,.0f} tok/s, encoder {N / e['seconds']:,.0f} tok/s: ratio "
            f"{e['seconds'] / c['seconds']:.2f}, state {c['state_bytes'] / 2**20:.1f} MiB"
        )
    res["command"] = "python benchmarks/features.py " + " ".join(sys.argv[1:])
    res["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(res) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
