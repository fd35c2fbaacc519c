"""Per-layer against cross-layer TopK at the same total L0 and tokens (clt.topk_scope=layer|all).

    python benchmarks/topk_scope.py                                  # the demo config, TopK
    python benchmarks/topk_scope.py clt=batchtopk --out runs/scope-b  # BatchTopK; any train.py overrides

Trains the same config twice (same seed, data and steps; only clt.topk_scope differs) with
`train.py`, then prints a markdown table from each run's report.json: held-out FVU and L0 per layer,
spliced CE and CE-loss score (both scopes evaluated in their inference form: per-layer TopK exact,
cross-layer TopK its learned per-layer thresholds). Appends the numbers to
benchmarks/results/topk_scope.jsonl. `--table-only` tabulates runs already trained.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCOPES = ("layer", "all")


def table(reports: dict[str, dict]) -> str:
    """Markdown: one row per layer (FVU and L0 of each scope), then the totals and the CE rows."""
    n = len(next(iter(reports.values()))["fvu_per_layer"])
    head = "| layer | " + " | ".join(f"FVU ({s}) | L0 ({s})" for s in reports) + " |"
    rows = [head, "|" + "---|" * (1 + 2 * len(reports))]
    for layer in range(n):
        cells = [
            f"{r['fvu_per_layer'][layer]:.3f} | {r['l0_per_layer'][layer]:.1f}" for r in reports.values()
        ]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    cells = [f"**{r['fvu']:.3f}** | **{sum(r['l0_per_layer']):.1f}** (total)" for r in reports.values()]
    rows.append("| mean FVU / total L0 | " + " | ".join(cells) + " |")
    for key, name in (("eval/ce_loss_spliced", "spliced CE"), ("eval/ce_loss_score", "CE-loss score")):
        rows.append(f"| {name} | " + " | ".join(f"{r[key]:.3f} | " for r in reports.values()) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="train.py overrides shared by both runs")
    ap.add_argument("--out", type=Path, default=Path("runs/scope"), help="runs go to OUT-layer, OUT-all")
    ap.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "topk_scope.jsonl")
    args = ap.parse_args()
    runs = {s: Path(f"{args.out}-{s}") for s in SCOPES}
    seconds = {}
    for scope, run in runs.items():
        if args.table_only:
            continue
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            str(REPO / "train.py"),
            *args.overrides,
            f"clt.topk_scope={scope}",
            f"run_dir={run}",
        ]
        subprocess.run(cmd, check=True, cwd=REPO)
        seconds[scope] = round(time.perf_counter() - t0, 1)
    missing = [str(r) for r in runs.values() if not (r / "report.json").exists()]
    if missing:
        raise SystemExit(f"error: not a finished run (no report.json): {', '.join(missing)}")
    reports = {s: json.loads((r / "report.json").read_text()) for s, r in runs.items()}
    print(table(reports))
    if not args.table_only:
        line = {
            "command": "python benchmarks/topk_scope.py " + " ".join(args.overrides),
            "device": platform.processor() or platform.machine(),
            "seconds": seconds,
            **{
                s: {
                    k: r.get(k)
                    for k in (
                        "fvu_per_layer",
                        "l0_per_layer",
                        "fvu",
                        "eval/ce_loss_spliced",
                        "eval/ce_loss_score",
                    )
                }
                for s, r in reports.items()
            },
        }
        with args.results.open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
