"""Training curves of finished runs side by side: FVU against tokens, and FVU against wall time.

    python benchmarks/curves.py runs/a runs/b --labels "bandwidth 1.0" "bandwidth 0.1" --out curves.png

Reads each run's `logs/version_0/metrics.csv` (metrics/fvu per step, perf/tokens_per_s for the
time axis) and `report.json` (held-out FVU, L0, CE-loss score), draws the two panels, and appends
one line per run to `benchmarks/results/curves.jsonl`: the held-out numbers, the training FVU
averaged over the last 10% of steps, and the wall time from the throughput log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(run: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from clt.report import read_metrics

    series = read_metrics(run / "logs" / "version_0" / "metrics.csv")
    cfg = json.loads((run / "config.json").read_text())
    report = json.loads((run / "report.json").read_text())
    batch = cfg["trainer"]["batch_tokens"]
    fvu = series["metrics/fvu"]
    rate = dict(series.get("perf/tokens_per_s", []))
    # wall time: the logged rates between logged steps (the first step, warm-up, excluded)
    steps = sorted(rate)
    wall, clock, last = {}, 0.0, 0
    for s in steps:
        clock += (s - last) * batch / rate[s]
        wall[s], last = clock, s
    tail = [v for _, v in fvu[-max(1, len(fvu) // 10) :]]
    return {
        "run": str(run),
        "steps": [s for s, _ in fvu],
        "fvu": [v for _, v in fvu],
        "tokens": [(s + 1) * batch for s, _ in fvu],
        "wall": wall,
        "summary": {
            "held_out_fvu": report.get("fvu"),
            "l0": report.get("l0"),
            "ce_loss_score": report.get("eval/ce_loss_score"),
            "train_fvu_last_10pct": sum(tail) / len(tail),
            "steps": report.get("steps"),
            "wall_s": clock,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    ap.add_argument("--labels", nargs="+", help="one per run (default: the directory names)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    ap.add_argument("--command", default="", help="how the runs were made (recorded with the results)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "curves.jsonl")
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("error: give one label per run")
    missing = [str(r) for r in args.runs if not (r / "report.json").exists()]
    if missing:
        raise SystemExit(f"error: not a finished run (no report.json): {', '.join(missing)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [load(r) for r in args.runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for d, label in zip(data, labels):
        ax1.plot(d["tokens"], d["fvu"], label=label, lw=1)
        steps = [s for s in d["steps"] if s in d["wall"]]
        ax2.plot(
            [d["wall"][s] for s in steps], [d["fvu"][d["steps"].index(s)] for s in steps], label=label, lw=1
        )
    ax1.set(xlabel="training tokens", ylabel="training FVU (per batch)", yscale="log")
    ax2.set(xlabel="wall time of training (s)", ylabel="training FVU (per batch)", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    stamp = time.strftime("%Y-%m-%d")
    with open(args.results, "a") as f:
        for d, label in zip(data, labels):
            row = {
                "label": label,
                **d["summary"],
                "title": args.title,
                "command": args.command,
                "date": stamp,
            }
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row))


if __name__ == "__main__":
    main()
