"""Throughput of activation generation and of the CLT training step, on the demo config by default.

    python benchmarks/throughput.py                        # demo config (SmolLM2-135M, F=512, k=16)
    python benchmarks/throughput.py clt.d_sae=1024 trainer.batch_tokens=1024 --steps 5

Prints tokens/s for: subject forward with hooks (activation generation, bf16 and fp32), the CLT
step (forward + backward + Adam) with sparse and with dense decode, and the whole pipeline
(generation + step), each as a ratio against the dense reference measured in the same run.
Results are appended to benchmarks/results/throughput.jsonl with the settings and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path[:] = [
    p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"
]  # kernels.py here is not the kernels package


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from clt.config import load_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return load_config(hcompose(config_name="config", overrides=overrides))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions per measurement")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput.jsonl"))
    args = ap.parse_args()

    from clt.data import ActivationSource
    from clt.data.text import TextPosition
    from clt.model import CLTArchitecture
    from clt.subject import load_subject
    from clt.training import CLTModule

    cfg = compose(args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {
        "settings": {
            "overrides": args.overrides,
            "d_sae": cfg.clt.d_sae,
            "k": cfg.clt.k,
            "activation": cfg.clt.activation,
            "batch_tokens": cfg.trainer.batch_tokens,
            "context_size": cfg.data.context_size,
            "batch_windows": cfg.data.batch_windows,
            "model": cfg.model.name_or_path,
        },
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }

    # -- activation generation ----------------------------------------------------------------
    gen = {}
    for dtype in ("bfloat16", "float32"):
        subject = load_subject(replace(cfg.model, dtype=dtype), device)
        source = ActivationSource(subject, cfg.data, cfg.trainer.batch_tokens)
        it = source.text.windows(TextPosition())
        windows = torch.stack([next(it)[0] for _ in range(cfg.data.batch_windows)])
        sec = timed(lambda: source.activations(windows), args.steps)  # noqa: B023
        gen[dtype] = windows.shape[0] * (windows.shape[1] - 1) / sec
    results["generation_tokens_per_s"] = gen

    # -- the CLT step ---------------------------------------------------------------------------
    x, y = source.activations(windows)
    n = cfg.trainer.batch_tokens
    reps = -(-n // x.shape[0])
    x, y = x.repeat(reps, 1, 1)[:n].to(device), y.repeat(reps, 1, 1)[:n].to(device)
    step = {}
    for decode in ("dense", "sparse"):
        c = cfg.clt
        arch = CLTArchitecture(
            n_layers=subject.n_layers, d_model=subject.d_model, d_sae=c.d_sae, activation=c.activation, k=c.k
        )
        module = CLTModule(cfg, arch).to(device)
        module.clt.decode_path = decode
        module.initialize_from_data(x, y)
        opt = torch.optim.Adam(module.clt.parameters(), lr=1e-4)

        def one_step(module=module, opt=opt):
            opt.zero_grad(set_to_none=True)
            module.loss(x, y)[0].backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        step[decode] = n / timed(one_step, args.steps)
        del module, opt
    results["clt_step_tokens_per_s"] = step
    pipeline = 1 / (1 / gen["bfloat16"] + 1 / step["sparse"])
    results["pipeline_tokens_per_s"] = pipeline

    print(json.dumps(results["settings"]))
    print(f"device: {results['device']}")
    print(
        f"activation generation  bf16 {gen['bfloat16']:9.0f} tok/s   fp32 {gen['float32']:9.0f} tok/s   "
        f"bf16/fp32 = {gen['bfloat16'] / gen['float32']:.2f}x"
    )
    print(
        f"CLT step            sparse {step['sparse']:9.0f} tok/s  dense {step['dense']:9.0f} tok/s   "
        f"sparse/dense = {step['sparse'] / step['dense']:.2f}x"
    )
    print(
        f"pipeline (bf16 generation + sparse step, serial): {pipeline:.0f} tok/s; time share: "
        f"generation {pipeline / gen['bfloat16']:.0%}, CLT step {pipeline / step['sparse']:.0%}"
    )
    results["command"] = "python benchmarks/throughput.py " + " ".join(args.overrides)
    results["date"] = time.strftime("%Y-%m-%d")
    import subprocess

    results["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(results) + "\n")
    print(f"appended to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
