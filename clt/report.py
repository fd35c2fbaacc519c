"""End-of-run report: per-layer FVU/L0 table on held-out windows, the replacement model's CE/KL,
a loss-curve PNG, `report.json`, and the final native checkpoint with these numbers in its summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from .files import write_atomic
from .metrics import reconstruction_stats, spliced_eval
from .model import CrossLayerTranscoder


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSV log -> {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.exists():
        return series
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k != "step" and v not in (None, ""):
                    series.setdefault(k, []).append((step, float(v)))
    return series


def _ema(vals: list[float], decay: float = 0.8) -> list[float]:
    out, m = [], vals[0]
    for v in vals:
        m = decay * m + (1 - decay) * v
        out.append(m)
    return out


def plot_curves(
    series: dict[str, list[tuple[int, float]]],
    out: Path,
    fvu_per_layer: list[float] | None = None,
    l0_per_layer: list[float] | None = None,
) -> Path:
    """Training loss and FVU (raw and EMA), held-out CE (clean / spliced / zero-ablated MLPs), and
    the per-layer FVU and L0 on held-out text at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for k, color in (("losses/total", "C0"), ("metrics/fvu", "C1")):
        if k in series:
            steps, vals = zip(*series[k])
            ax.plot(steps, vals, color=color, alpha=0.3, lw=1)
            ax.plot(steps, _ema(list(vals)), color=color, label=f"{k} (EMA)")
    ax.set_title("training loss")
    ax.set_yscale("log")
    ax = axes[1]
    for k in ("eval/ce_loss_clean", "eval/ce_loss_spliced", "eval/ce_loss_zero_ablation"):
        if k in series:
            steps, vals = zip(*series[k])
            ax.plot(steps, vals, label=k.removeprefix("eval/"), marker="o", ms=3)
    ax.set_title("held-out CE (CLT spliced into every MLP)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax = axes[2]
    if fvu_per_layer:
        layers = range(len(fvu_per_layer))
        bars = ax.bar(layers, fvu_per_layer, color="C1", alpha=0.7, label="FVU")
        ax.set_ylabel("FVU")
        ax.set_xlabel("layer")
        ax2 = ax.twinx()
        (line,) = ax2.plot(layers, l0_per_layer, color="C2", marker=".", label="L0")
        ax2.set_ylabel("L0")
        ax2.set_ylim(0, 1.15 * max(l0_per_layer or [1]))
        ax.legend(handles=[bars, line], fontsize=8, loc="lower left")
    ax.set_title("held-out FVU and L0 per layer (end)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_table(fvu: torch.Tensor, l0: torch.Tensor) -> str:
    lines = ["layer    FVU     L0", "-----  ------  ------"]
    for i, (f, k) in enumerate(zip(fvu.tolist(), l0.tolist())):
        lines.append(f"{i:5d}  {f:6.3f}  {k:6.1f}")
    lines.append(f" mean  {fvu.mean().item():6.3f}  {l0.mean().item():6.1f}")
    return "\n".join(lines)


@torch.no_grad()
def final_report(
    clt: CrossLayerTranscoder,
    source,
    subject,
    eval_windows: torch.Tensor,
    run_dir: Path,
    silent_fraction: float | None = None,
) -> dict:
    """`silent_fraction`: features that did not fire over min(dead_after_tokens, tokens trained)."""
    clt = clt.eval()
    report: dict = {"run_dir": str(run_dir)}
    if silent_fraction is not None:
        report["silent_fraction"] = silent_fraction
    if eval_windows.numel():
        x, y = source.activations(eval_windows)
        stats = reconstruction_stats(clt, x.to(clt.W_enc.device), y.to(clt.W_enc.device))
        report |= {
            "fvu_per_layer": stats["fvu"].tolist(),
            "l0_per_layer": stats["l0"].tolist(),
            "fvu": stats["fvu"].mean().item(),
            "l0": stats["l0"].mean().item(),
            "held_out_tokens": int(x.shape[0]),
        }
        report |= spliced_eval(subject, clt, eval_windows)
        print(f"\nHeld-out reconstruction ({x.shape[0]} tokens):")
        print(format_table(stats["fvu"], stats["l0"]))
        print(
            f"\nReplacement model (CLT spliced into every MLP), held-out CE:\n"
            f"  clean {report['eval/ce_loss_clean']:.3f}   spliced {report['eval/ce_loss_spliced']:.3f}   "
            f"zero-ablated MLPs {report['eval/ce_loss_zero_ablation']:.3f}\n"
            f"  KL(clean || spliced) {report['eval/kl_spliced']:.3f}   "
            f"CE-loss score {report['eval/ce_loss_score']:.3f}"
        )
    if silent_fraction is not None:
        print(
            f"  features silent over the dead-feature window (or the whole run if shorter): "
            f"{silent_fraction:.1%}"
        )
    series = read_metrics(run_dir / "logs" / "version_0" / "metrics.csv")
    report["loss_curve"] = str(
        plot_curves(
            series, run_dir / "loss_curve.png", report.get("fvu_per_layer"), report.get("l0_per_layer")
        )
    )
    if "losses/total" in series:
        report["steps"] = series["losses/total"][-1][0] + 1
        report["final_train_loss"] = series["losses/total"][-1][1]
    summary = {
        k: v
        for k, v in report.items()
        if isinstance(v, (int, float, list)) and not (isinstance(v, float) and math.isnan(v))
    }
    clt.save_pretrained(run_dir / "clt", summary=summary)
    report["checkpoint"] = str(run_dir / "clt")
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2))
    print(f"\nloss curve: {report['loss_curve']}\nCLT checkpoint: {report['checkpoint']}")
    return report
