"""Training-step throughput on 1 vs 2 (or N) processes: data parallel and feature-sharded.

    python benchmarks/scaling.py                          # CPU, gloo, 1 thread per process
    python benchmarks/scaling.py --layers 12 --d-model 768 --d-sae 8192 --batch 4096   # GPU sizes

The CLT step of training (clt/training/module.py CLTModule.loss: encode, global TopK, decode, losses,
backward, Adam) on synthetic activations of a fixed global batch, for
  1 process                     the reference, measured in the same run
  N processes, data parallel    each a 1/N slice of the batch; gradients averaged (all-reduce)
  N processes, feature-sharded  each 1/N of every layer's features, the whole batch (clt/parallel.py)
tokens/s = global batch tokens / median step time; ratios against the 1-process reference. On CPU
every process gets --threads threads (so 2 processes use 2× the cores of the reference: the
scaling question); on GPU one process per GPU with NCCL (needs N GPUs). Results are appended to
benchmarks/results/scaling.jsonl with the settings and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path[:] = [
    p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"
]  # kernels.py here is not the kernels package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_module(a, device):
    from clt.config import TrainConfig
    from clt.model import CLTArchitecture
    from clt.training import CLTModule

    cfg = TrainConfig()
    cfg.clt.activation, cfg.clt.d_sae, cfg.clt.k = a.activation, a.d_sae, a.k
    torch.manual_seed(0)
    arch = CLTArchitecture(
        n_layers=a.layers, d_model=a.d_model, d_sae=a.d_sae, activation=a.activation, k=a.k
    )
    return CLTModule(cfg, arch).to(device)


def worker(rank: int, world: int, port: int, mode: str, a, out) -> None:
    from clt.parallel import Parallel, shard_clt, shard_range

    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(a.threads)
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    m = make_module(a, device)
    m.train()
    n = a.batch // world if mode == "data" else a.batch
    if mode == "shard":
        lo, hi = shard_range(a.d_sae, rank, world)
        m.clt = shard_clt(m.clt, rank, world)
        m.tokens_since_fired = m.tokens_since_fired[:, lo:hi].clone()
        m.mesh = Parallel(sharded=True)
    elif mode == "data":
        m.mesh = Parallel(data_parallel=True)
    m.clt.mesh = m.mesh
    opt = torch.optim.Adam(m.clt.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(rank if mode == "data" else 0)
    x = torch.randn(n, a.layers, a.d_model, generator=g, device=device)
    y = torch.randn(n, a.layers, a.d_model, generator=g, device=device)
    times = []
    for step in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = m.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode == "data":  # what DDP does (bucketed there): average the gradients over the replicas
            for p in m.clt.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    if world > 1:
        t = torch.tensor([statistics.median(times)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
        dist.destroy_process_group()
        if rank == 0:
            out.put(t.item())
    else:
        out.put(statistics.median(times))


def measure(mode: str, world: int, a) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, mode, a, out)) for r in range(world)]
    for p in procs:
        p.start()
    t = out.get(timeout=1800)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"{mode} × {world}: a process failed (exit {p.exitcode})")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "jumprelu"])
    p.add_argument("--batch", type=int, default=1024, help="global batch (tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu
    if cuda and torch.cuda.device_count() < a.procs:
        raise SystemExit(
            f"{a.procs} processes need {a.procs} GPUs; this machine has {torch.cuda.device_count()}"
        )
    device = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    )
    print(
        f"{device}; L={a.layers} d={a.d_model} F={a.d_sae} k={a.k} {a.activation}, batch {a.batch} tokens, "
        f"{a.threads} thread(s)/process"
    )
    ref = measure("single", 1, a)
    rows = [("1 process", ref)]
    rows.append((f"{a.procs} processes, data parallel", measure("data", a.procs, a)))
    rows.append((f"{a.procs} processes, feature-sharded", measure("shard", a.procs, a)))
    print(f"{'':36s} {'step ms':>9s} {'tokens/s':>10s} {'× 1 proc':>9s}")
    results = []
    for name, t in rows:
        print(f"{name:36s} {t * 1e3:9.1f} {a.batch / t:10.0f} {ref / t:9.2f}")
        results.append({"setup": name, "step_s": t, "tokens_per_s": a.batch / t, "speedup": ref / t})
    out = REPO / "benchmarks" / "results" / "scaling.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(
            json.dumps(
                {
                    "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
                    "device": device,
                    "settings": vars(a),
                    "results": results,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
