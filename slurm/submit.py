"""Submit training to Slurm and print the job ids.

    python slurm/submit.py clt.k=64 run_dir=runs/k64                   # one node, 8 GPUs
    python slurm/submit.py --nodes 4 clt.shard_features=true           # 4 nodes × 8 GPUs
    python slurm/submit.py clt.k=16,32 clt.d_sae=4096,8192              # a sweep: a 4-task job array
    python slurm/submit.py --cpu --tasks-per-node 2 --dry-run clt.k=8   # print the sbatch command

Arguments it does not know are train.py overrides; any in Hydra's sweep syntax (a,b,c or
range(…)) make the run a sweep: the cartesian product of the values, one job-array task per
configuration (slurm/sweep.sbatch), each in <sweep dir>/<task>. One configuration runs with
slurm/single_node.sbatch (--nodes 1) or slurm/multi_node.sbatch. Prints `job <id>` (a sweep:
`array <id> tasks <n> dir <sweep dir>`). Exit status 2 with a one-line error when sbatch is missing
or refuses the job.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra sweep syntax -> the list of configurations (cartesian product, like Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.product(*axes)]


def sbatch_command(args, template: Path, extra: list[str], export: dict[str, str]) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--nodes={args.nodes}", f"--ntasks-per-node={args.tasks_per_node}"]
    if args.cpu:
        cmd += ["--gpus-per-node=0"]
        export = {**export, "CLT_TRAINER": "cpu"}
    else:
        cmd += [f"--gpus-per-node={args.tasks_per_node}"]
    if export:
        cmd += ["--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in export.items())])]
    if args.cpus_per_task:
        cmd += [f"--cpus-per-task={args.cpus_per_task}"]
    if args.partition:
        cmd += [f"--partition={args.partition}"]
    if args.time:
        cmd += [f"--time={args.time}"]
    if args.output:
        cmd += [f"--output={args.output}"]
    return cmd + extra + [str(template)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Other arguments: train.py overrides.", allow_abbrev=False
    )  # no abbreviations: `--sweep …` must not silently become --sweep-dir
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=8, help="processes (GPUs) per node")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--cpu", action="store_true", help="CPU-only nodes: no GPUs requested, trainer=cpu (gloo)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--output", default=None, help="Slurm log file pattern (default runs/slurm-%%j.out)")
    p.add_argument("--sweep-dir", default=None, help="where a sweep's runs go (default runs/sweep-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:  # an override never starts with a dash: a mistyped option must not be dropped or passed on
        print(f"error: unknown option {unknown[0]} (train.py overrides look like key=value)", file=sys.stderr)
        return 2
    if shutil.which("sbatch") is None and not args.dry_run:
        print(
            "error: sbatch not found: Slurm is not installed here (slurm/local-cluster.sh starts a "
            "one-node cluster for trying this)",
            file=sys.stderr,
        )
        return 2
    (REPO / "runs").mkdir(exist_ok=True)  # the templates log to runs/slurm-<job>.out
    configs = expand(overrides)
    if len(configs) == 1:
        template = HERE / ("single_node.sbatch" if args.nodes == 1 else "multi_node.sbatch")
        cmd = sbatch_command(args, template, [], {}) + configs[0]
    else:
        sweep_dir = Path(args.sweep_dir or REPO / "runs" / time.strftime("sweep-%Y-%m-%d_%H-%M-%S")).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_file = sweep_dir / "sweep.txt"
        sweep_file.write_text("".join(shlex.join(c) + "\n" for c in configs))
        cmd = sbatch_command(
            args,
            HERE / "sweep.sbatch",
            [f"--array=0-{len(configs) - 1}"],
            {"CLT_SWEEP_FILE": str(sweep_file), "CLT_SWEEP_DIR": str(sweep_dir)},
        )
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        print(f"error: sbatch refused the job: {done.stderr.strip()}", file=sys.stderr)
        return 2
    job = done.stdout.strip().split(";")[0]
    if len(configs) == 1:
        print(f"job {job}")
    else:
        print(f"array {job} tasks {len(configs)} dir {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
