"""End-of-run report: per-layer FVU/L0 table on held-out windows, the replacement model's CE/KL,
a loss-curve PNG, `report.json`, and the final native checkpoint with these numbers in its summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

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


def plot_curves(series: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, title in [
        (axes[0], ["losses/total", "metrics/fvu"], "loss"),
        (axes[1], ["metrics/l0"], "L0 (active features per token per layer)"),
        (axes[2], ["eval/ce_loss_clean", "eval/ce_loss_spliced", "eval/ce_loss_zero_ablation"], "held-out CE"),
    ]:
        for k in keys:
            if k in series:
                steps, vals = zip(*series[k])
                ax.plot(steps, vals, label=k, marker="o" if k.startswith("eval/") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if "losses/total" in series:
        axes[0].set_yscale("log")
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
def final_report(clt: CrossLayerTranscoder, source, subject, eval_windows: torch.Tensor, run_dir: Path,
                 last_eval: dict | None = None) -> dict:
    clt = clt.eval()
    report: dict = {"run_dir": str(run_dir)}
    if eval_windows.numel():
        x, y = source.activations(eval_windows)
        stats = reconstruction_stats(clt, x.to(clt.W_enc.device), y.to(clt.W_enc.device))
        report |= {"fvu_per_layer": stats["fvu"].tolist(), "l0_per_layer": stats["l0"].tolist(),
                   "fvu": stats["fvu"].mean().item(), "l0": stats["l0"].mean().item(),
                   "held_out_tokens": int(x.shape[0])}
        report |= spliced_eval(subject, clt, eval_windows)
        print(f"\nHeld-out reconstruction ({x.shape[0]} tokens):")
        print(format_table(stats["fvu"], stats["l0"]))
        print(f"\nReplacement model (CLT spliced into every MLP), held-out CE:\n"
              f"  clean {report['eval/ce_loss_clean']:.3f}   spliced {report['eval/ce_loss_spliced']:.3f}   "
              f"zero-ablated MLPs {report['eval/ce_loss_zero_ablation']:.3f}\n"
              f"  KL(clean || spliced) {report['eval/kl_spliced']:.3f}   "
              f"CE-loss score {report['eval/ce_loss_score']:.3f}")
    series = read_metrics(run_dir / "logs" / "version_0" / "metrics.csv")
    report["loss_curve"] = str(plot_curves(series, run_dir / "loss_curve.png"))
    if "losses/total" in series:
        report["steps"] = series["losses/total"][-1][0] + 1
        report["final_train_loss"] = series["losses/total"][-1][1]
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float, list)) and not
               (isinstance(v, float) and math.isnan(v))}
    clt.save_pretrained(run_dir / "clt", summary=summary)
    report["checkpoint"] = str(run_dir / "clt")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nloss curve: {report['loss_curve']}\nCLT checkpoint: {report['checkpoint']}")
    return report
