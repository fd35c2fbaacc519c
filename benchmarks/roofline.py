"""The CLT training step against the machine's limits, and against an earlier revision.

    python benchmarks/roofline.py                                  # demo shape (L=30, d=576, F=512, k=16)
    python benchmarks/roofline.py --baseline-rev 82d77a6           # + the same step at that revision
    python benchmarks/roofline.py --layers 12 --d 768 --d-sae 24576 --k 32 --tokens 4096   # GPT-2 small
    python benchmarks/roofline.py --activation jumprelu clt.init_firing_rate=0.03125   # JumpReLU at L0 ≈ 16

In one run: the machine's copy bandwidth and GEMM rate (measured here, not quoted), then each
component of the step (encoder forward, selection, decode forward and backward, encoder weight
gradient, optimizer, gradient norm) and the whole step (forward, backward, Adam as training runs
it), each with its analytical bound = max(bytes / bandwidth, flops / GEMM rate) and the fraction of
it reached. With `--baseline-rev`, the whole step of that git revision is timed in the same run (a
temporary worktree, the same shapes and data), so a speed-up is a ratio measured side by side.
Each revision's step runs in a fresh process, which also reports the step's peak memory over what
the module, its batch and its optimizer hold before the first step (resident bytes on CPU).
Synthetic activations (the step's cost does not depend on their values beyond the active set).
Results: benchmarks/results/roofline.jsonl, with the command, the commit and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> float:
    """Seconds per call (after one warm-up call), synchronising CUDA."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    """Memory bandwidth (bytes read + written per second: the best of a copy, an a + b stream, an
    in-place update and a fused Adam step over 256 MiB; a write to another buffer also reads it
    first on most CPUs) and the fp32 GEMM rate (flop/s), measured."""
    a = torch.ones(64 * 2**20, device=device)
    b, c = torch.ones_like(a), torch.empty_like(a)
    copy = 2 * a.numel() * 4 / timed(lambda: c.copy_(a), 5)
    add = 3 * a.numel() * 4 / timed(lambda: torch.add(a, b, out=c), 5)
    add = max(add, 2 * a.numel() * 4 / timed(lambda: a.mul_(1.0), 5))
    p = torch.nn.Parameter(torch.ones(a.numel() // 4, device=device))  # fused Adam: 7 streams
    p.grad = torch.ones_like(p)
    adam = torch.optim.Adam([p], fused=True)
    add = max(add, 7 * p.numel() * 4 / timed(adam.step, 5))
    n = 2048
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    gemm = timed(lambda: x @ y, 5)
    return {"bandwidth_Bps": max(copy, add), "gemm_flops": 2 * n**3 / gemm}


def make_module(args, device: str):
    """A CLTModule at the benchmark's shape, initialised from synthetic activations, and a batch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import compose

    from clt.model import CLTArchitecture
    from clt.training import CLTModule

    extra = getattr(args, "overrides", [])
    cfg = compose([f"clt={args.activation}", f"clt.d_sae={args.d_sae}", f"clt.k={args.k}", *extra])
    shape = dict(n_layers=args.layers, d_model=args.d, d_sae=args.d_sae, activation=args.activation, k=args.k)
    # the CLT config's other architecture knobs (bandwidth, …) as training would set them
    knobs = {f.name: getattr(cfg.clt, f.name) for f in fields(CLTArchitecture) if hasattr(cfg.clt, f.name)}
    arch = CLTArchitecture(**(knobs | shape))
    torch.manual_seed(0)
    m = CLTModule(cfg, arch).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.layers, args.d, generator=g, device=device)
    y = 0.1 * torch.randn(args.tokens, args.layers, args.d, generator=g, device=device)
    m.initialize_from_data(x, y)
    m.train()
    return m, x, y


class PeakRSS:
    """The largest resident set size of this process while the block runs (sampled every 2 ms
    from /proc/self/statm; Linux)."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_time(args, device: str) -> dict:
    """The training step (loss, backward, the module's own optimizer, as training runs it):
    seconds per step, and the memory the step adds at its peak over what the module, its batch
    and its optimizer hold before the first step (CUDA: allocated bytes; CPU: resident bytes)."""
    m, x, y = make_module(args, device)
    opt = m.configure_optimizers()["optimizer"]

    def step():
        loss, _ = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        timed(step, 1)  # the optimizer state exists from here on
        sec = timed(step, args.reps)
    used = torch.cuda.max_memory_allocated() - before if device == "cuda" else peak.peak - peak.start
    return {"seconds": sec, "peak_bytes": used}


def components(args, device: str, mach: dict) -> dict:
    """Each part of the step: seconds, its bound, and the fraction of the bound reached."""
    from clt import kernels
    from clt.kernels import cpu
    from clt.kernels.jumprelu import scan as jumprelu_scan
    from clt.kernels.reference import encoder_weight_grad
    from clt.metrics import l0_per_layer
    from clt.sparsity import SparseActivations, TopKActivations

    m, x, y = make_module(args, device)
    clt = m.clt
    N, L, d, F, k = args.tokens, args.layers, args.d, args.d_sae, args.k
    bw, rate = mach["bandwidth_Bps"], mach["gemm_flops"]
    n_dec = sum(w.numel() for w in clt.W_dec)  # decoder parameters: F · d · L(L+1)/2
    rows = N * k * (L + 1) * d // 2  # decoder row entries read by a sparse decode (k per token, layer)
    out: dict = {}

    def part(name, fn, flops, bytes_):
        sec = timed(fn, args.reps)
        bound = max(flops / rate, bytes_ / bw)
        out[name] = {"ms": 1e3 * sec, "bound_ms": 1e3 * bound, "of_bound": bound / sec}

    xn = x * clt.input_scale[:, None]
    part(
        "encoder_forward",
        lambda: torch.einsum("nld,lfd->nlf", xn, clt.W_enc),
        2 * N * L * F * d,
        4 * (N * L * d + L * F * d + N * L * F),
    )
    with torch.no_grad():
        h = clt.encode(x)
        fused = clt.jumprelu_terms(x, clt.decoder_norms(), m.cfg.clt.sparsity_c)  # JumpReLU's entries
    if fused is not None:  # JumpReLU as training runs it: one scan of h into its entries
        theta = clt.threshold.detach()
        lo = theta - clt.arch.bandwidth / 2
        part("selection", lambda: jumprelu_scan(h, theta, lo), 0, 4 * N * L * F)
    else:
        part("selection", lambda: clt.activate_entries(h), 0, 4 * 2 * N * L * F)
    with torch.no_grad():  # as training selects: TopK and JumpReLU as their entries, the others dense
        a = fused[1] if fused is not None else clt.activate_entries(h)
        entries = isinstance(a, TopKActivations | SparseActivations)
        support = None if entries else clt.gradient_support(h, a)
        out["l0"] = float(l0_per_layer(a).mean())  # active features per token and layer
        if isinstance(a, SparseActivations):
            out["gradient_support"] = a.vals.numel() / (N * L * F)
        else:
            dense = a.dense() if entries else a
            out["gradient_support"] = float(((dense != 0) if support is None else support).float().mean())
    W = list(clt.W_dec)
    part(
        "decode_forward",
        lambda: kernels.decode(a, W, support, clt.decode_path),
        2 * rows,
        4 * (n_dec + N * L * d),
    )
    if isinstance(a, TopKActivations):
        a_g = TopKActivations(a.vals.detach().requires_grad_(), a.idx, a.d_sae)
        leaf = a_g.vals
    elif isinstance(a, SparseActivations):
        a_g = a._replace(vals=a.vals.detach().requires_grad_())
        leaf = a_g.vals
    else:
        a_g = leaf = a.detach().requires_grad_()

    def decode_backward():  # ∂a on the training's gradient support (JumpReLU: its θ band too)
        yh = kernels.decode(a_g, W, support, clt.decode_path)
        torch.autograd.grad(yh, [leaf, *W], torch.ones_like(yh))

    dec_fwd = out["decode_forward"]["ms"] / 1e3
    sec = timed(decode_backward, args.reps) - dec_fwd
    bound = max(4 * rows / rate, 4 * 2 * n_dec / bw)  # ∂a and ∂W_dec; read W, write its gradient
    out["decode_backward"] = {"ms": 1e3 * sec, "bound_ms": 1e3 * bound, "of_bound": bound / sec}
    gh = torch.zeros_like(h).scatter(-1, h.topk(k, -1).indices, 1.0)  # k non-zero ∂h per token
    on_gpu = device == "cuda" and kernels.triton_available()
    sparse_grad = (device == "cpu" and cpu.usable(gh, xn)) or on_gpu
    part(  # as training takes it (the sparse kernel where it serves)
        "encoder_weight_grad",
        lambda: encoder_weight_grad(gh, xn) if sparse_grad else torch.einsum("nlf,nld->lfd", gh, xn),
        2 * N * L * k * d,  # what the math needs: k of F pre-activations per token carry gradient
        4 * (N * L * d + L * F * d),
    )
    params = list(clt.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = m.configure_optimizers()["optimizer"]
    opt.grad_scale = torch.ones((), device=device)  # the clip folded into the step, as in training
    n_par = sum(p.numel() for p in params)
    part("optimizer", opt.step, 0, 4 * 7 * n_par)  # read p, g, m, v; write p, m, v (fp32)
    part(  # the clip's norm (its scaling is folded into the optimizer step)
        "grad_norm",
        lambda: m.mesh.grad_norm(clt.named_parameters()),
        0,
        4 * n_par,  # read the gradients once
    )
    return out


def step_in_subprocess(root: Path, args) -> dict:
    """`step_time` in a fresh process on the package at `root` (this checkout or a worktree of an
    earlier revision), so that both revisions' steps start from the same empty process."""
    code = (
        "import sys, json; sys.argv = sys.argv[:1]; "
        f"sys.path.insert(0, {str(root)!r}); sys.path.insert(0, {str(root / 'benchmarks')!r}); "
        f"import importlib.util; spec = importlib.util.spec_from_file_location('rl', {__file__!r}); "
        "rl = importlib.util.module_from_spec(spec); spec.loader.exec_module(rl); "
        f"rl.REPO = rl.Path({str(root)!r}); import clt; "
        f"assert clt.__file__.startswith({str(root)!r}), clt.__file__; "
        f"a = rl.argparse.Namespace(**{vars(args)!r}); "
        "print(json.dumps(rl.step_time(a, 'cuda' if rl.torch.cuda.is_available() else 'cpu')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), **_env()},
    )
    if done.returncode != 0:
        raise SystemExit(f"the step at {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline(rev: str, args) -> dict:
    """`step_time` of revision `rev`, from a temporary worktree."""
    with tempfile.TemporaryDirectory(prefix="clt-baseline-") as tmp:
        wt = Path(tmp) / "wt"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(wt), rev], cwd=REPO, check=True)
        try:
            return step_in_subprocess(wt, args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=REPO, check=False)


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    example = "clt.bandwidth=0.1 clt.init_firing_rate=0.03"
    ap.add_argument("overrides", nargs="*", help=f"Hydra overrides of the CLT config ({example})")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step")
    ap.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline-rev", default=None, help="a git revision whose step is timed alongside")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "roofline.jsonl"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mach = machine(device)
    shape = {k: getattr(args, k) for k in ("layers", "d", "d_sae", "k", "tokens", "activation")}
    shape["overrides"] = args.overrides
    print(
        f"{device} ({torch.get_num_threads()} threads): memory {mach['bandwidth_Bps'] / 1e9:.1f} GB/s, "
        f"GEMM {mach['gemm_flops'] / 1e9:.0f} GFLOP/s; shape {shape}"
    )
    parts = components(args, device, mach)
    l0, support = parts.pop("l0"), parts.pop("gradient_support")
    need = f"{100 * support:.1f}% of (token, feature) pairs need ∂a"
    print(f"  at initialisation: L0 {l0:.1f} per token and layer; {need}")
    for name, r in parts.items():
        share = f"{100 * r['of_bound']:5.1f}% of it"
        print(f"  {name:20s} {r['ms']:9.1f} ms   bound {r['bound_ms']:8.1f} ms   {share}")
    mine = step_in_subprocess(REPO, args)
    step = mine["seconds"]
    bound = sum(r["bound_ms"] for r in parts.values()) / 1e3
    print(
        f"  {'whole step':20s} {1e3 * step:9.1f} ms   bound {1e3 * bound:8.1f} ms   "
        f"{100 * bound / step:5.1f}% of it; {args.tokens / step:,.0f} tokens/s; "
        f"peak memory {mine['peak_bytes'] / 2**20:,.0f} MiB over the state before the first step"
    )
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({_cpu_name()})",
        "threads": torch.get_num_threads(),
        "shape": shape,
        "machine": mach,
        "components": parts,
        "l0": l0,
        "gradient_support": support,
        "step_ms": 1e3 * step,
        "step_peak_bytes": mine["peak_bytes"],
        "step_bound_ms": 1e3 * bound,
        "tokens_per_s": args.tokens / step,
        "command": "python benchmarks/roofline.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.baseline_rev:
        theirs = baseline(args.baseline_rev, args)
        base = theirs["seconds"]
        result |= {
            "baseline_rev": args.baseline_rev,
            "baseline_step_ms": 1e3 * base,
            "baseline_peak_bytes": theirs["peak_bytes"],
            "speedup": base / step,
        }
        ratio = f"this revision is {base / step:.2f}×"
        mem = f"peak memory {theirs['peak_bytes'] / 2**20:,.0f} MiB"
        print(f"  baseline {args.baseline_rev}: {1e3 * base:.1f} ms per step, {mem}; {ratio}")
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
