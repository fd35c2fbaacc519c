"""On a real Slurm cluster started here (slurm/local-cluster.sh: munged, slurmctld, slurmd on this
machine): a 2-task srun data-parallel run, a Hydra multirun as a job array (hydra-submitit-launcher)
and slurm/submit.py's array sweep, and a job that gets SIGUSR1 mid-run: it checkpoints, is requeued
by Slurm and finishes with the same weights as an uninterrupted run. Skipped, with the reason, only
where Slurm cannot be installed (not root, no apt-get)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, tiny_overrides, train_cli

from clt.io import load_clt

SCRIPT = REPO / "slurm" / "local-cluster.sh"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    env = os.environ | {"CLT_SLURM_BASE": str(base), "CLT_SLURM_PORT": "6937"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "install"], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode:
        pytest.skip(f"Slurm cannot be installed here: {(done.stderr or done.stdout).strip()[-300:]}")
    done = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr  # installed but not starting: a real failure
    env |= {
        "SLURM_CONF": str(base / "etc" / "slurm.conf"),
        "PATH": f"{base / 'bin'}:{os.environ['PATH']}",
        "CLT_PYTHON": sys.executable,
    }
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]  # a test run inside a Slurm job must not leak that job's ids
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def job_states(env, job: str) -> list[dict]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.splitlines()]


def wait(env, job: str, until, timeout: float = 300) -> list[dict]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = job_states(env, job)
        if states and until(states):
            return states
        time.sleep(0.5)
    raise AssertionError(f"job {job}: {job_states(env, job)}")


def finished(states) -> bool:
    return all(s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for s in states)


def submit(env, *args) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "submit.py"), "--cpu", "--cpus-per-task", "1", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def overrides(model_dir, run_dir, **extra):
    return tiny_overrides(model_dir, run_dir, **{"trainer.num_threads": 1, **extra})


def test_two_task_srun_data_parallel(slurm, tiny_model_dir, tmp_path):
    log = tmp_path / "job.out"
    job = submit(
        slurm, "--tasks-per-node", "2", "--output", str(log), *overrides(tiny_model_dir, tmp_path / "run")
    )
    states = wait(slurm, job, finished)
    text = log.read_text(errors="replace")
    assert states[0]["JobState"] == "COMPLETED", text[-3000:]
    assert "job " + job + " restart 0" in text and "2 tasks" in text
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # Lightning took ranks and world from Slurm
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 20 and len(state["clt_data_positions"]) == 2
    assert load_clt(tmp_path / "run" / "clt").d_sae == 64


def test_hydra_multirun_as_a_job_array(slurm, tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in overrides(tiny_model_dir, "unused") if not a.startswith("run_dir=")]
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            *args,
            "clt.k=2,4,6,8",
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    arrays = {t.split("_")[0] for t in tasks}
    assert len(arrays) == 1, tasks  # one job array: <array id>_<task>
    array = next(iter(arrays))
    assert tasks == [f"{array}_{i}" for i in range(4)]
    for i, k in enumerate((2, 4, 6, 8)):
        clt = load_clt(sweep / str(i) / "clt")  # each task trained its configuration and saved it
        assert clt.arch.k == k
        assert (sweep / str(i) / "checkpoints" / "last.ckpt").exists()


def test_submit_py_sweep_array(slurm, tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in overrides(tiny_model_dir, "unused") if not a.startswith("run_dir=")]
    job = submit(
        slurm,
        "--tasks-per-node",
        "1",
        "--sweep-dir",
        str(sweep),
        "--output",
        str(tmp_path / "%A_%a.out"),
        *args,
        "clt.k=3,5",
    )
    states = wait(slurm, job, lambda s: len(s) == 2 and finished(s))
    assert [s["JobState"] for s in states] == ["COMPLETED"] * 2, [
        p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.out")
    ]
    assert sorted(s["ArrayTaskId"] for s in states) == ["0", "1"]
    assert [load_clt(sweep / str(i) / "clt").arch.k for i in (0, 1)] == [3, 5]


def test_sigusr1_checkpoints_requeues_and_finishes_with_the_same_weights(slurm, tiny_model_dir, tmp_path):
    extra = {"trainer.max_steps": 200, "trainer.ckpt_every": 1000, "trainer.eval_every": 0}
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        slurm, "--tasks-per-node", "1", "--output", str(log), *overrides(tiny_model_dir, run_dir, **extra)
    )
    t0 = time.time()
    while not (run_dir / "config.json").exists():  # the run is set up; its signal handler is in place
        assert time.time() - t0 < 120 and job_states(slurm, job)[0]["JobState"] in ("PENDING", "RUNNING"), (
            log.read_text(errors="replace")[-3000:] if log.exists() else job_states(slurm, job)
        )
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    # Slurm holds a requeued job ~2 minutes before it is eligible again; let it start at once
    wait(slurm, job, lambda s: s[0].get("Restarts") == "1" and s[0]["JobState"] == "PENDING", timeout=120)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    states = wait(slurm, job, lambda s: s[0].get("Restarts") == "1" and finished(s))
    text = log.read_text(errors="replace")
    assert states[0]["JobState"] == "COMPLETED", text[-3000:]
    step = int(re.search(r"preemption signal: checkpoint at step (\d+); requeueing Slurm job", text).group(1))
    assert 0 < step < 200
    assert f"job {job} restart 1" in text and "Restoring states from the checkpoint" in text

    reference = tmp_path / "reference"
    done = train_cli(overrides(tiny_model_dir, reference, **extra))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_clt(run_dir / "clt"), load_clt(reference / "clt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 200


def test_missing_slurm_is_a_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"} | {"PATH": str(bin_dir)}
    assert shutil.which("sbatch", path=env["PATH"]) is None
    done = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "submit.py"), "clt.k=8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: sbatch not found: Slurm is not installed here")


def test_a_mistyped_option_is_refused_not_dropped(tmp_path):
    """`--sweep clt.k=16,32` once abbreviated to --sweep-dir and silently dropped the k sweep."""
    done = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "submit.py"), "--sweep", "clt.k=16,32", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: unknown option --sweep (train.py overrides look like key=value)"
    )


def two_task_array(slurm, tmp_path, name: str, args: list[str]) -> None:
    """`sbatch --array=0-1 slurm/<name>.sbatch ARGS`: both tasks complete and say which they are."""
    done = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-1",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={tmp_path}/{name}-%a.out",
            str(REPO / "slurm" / f"{name}.sbatch"),
            *args,
        ],
        cwd=REPO,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    states = wait(slurm, job, lambda s: len(s) == 2 and finished(s))
    logs = [p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"{name}-*.out"))]
    assert [s["JobState"] for s in states] == ["COMPLETED"] * 2, [t[-2000:] for t in logs]
    assert any(f"{name} task 0 of 2" in t for t in logs) and any(f"{name} task 1 of 2" in t for t in logs)


def test_cache_generation_as_a_job_array(slurm, tiny_model_dir, tmp_path):
    """slurm/cache.sbatch --array=0-1: each task writes its slice of the shards; the cache that
    results is the one a single process writes."""
    args = [
        f"model.name_or_path={tiny_model_dir}",
        "model.dtype=float32",
        "cache.tokens=2000",
        "cache.shard_tokens=500",
        "data.context_size=32",
        "data.eval_docs=2",
    ]
    two_task_array(slurm, tmp_path, "cache", [*args, f"cache.dir={tmp_path / 'array'}"])
    single = subprocess.run(
        [sys.executable, "-m", "clt.cache", *args, f"cache.dir={tmp_path / 'single'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    from clt.data.activation_cache import (
        read_manifest,  # (merges, should both tasks have finished at the same instant)
    )

    manifests = [read_manifest(tmp_path / d) for d in ("array", "single")]
    assert manifests[0] == manifests[1] and manifests[0]["n_shards"] == 4


def test_feature_cards_as_a_job_array(slurm, tiny_model_dir, tmp_path):
    """slurm/features.sbatch --array=0-1: each task scans its share of the tokens, the last one
    merges; the store equals the one a single process writes."""
    from clt.features import FeatureStore
    from clt.model import CLTArchitecture, CrossLayerTranscoder

    CrossLayerTranscoder(
        CLTArchitecture(
            n_layers=3, d_model=32, d_sae=24, activation="topk", k=3, subject_model=str(tiny_model_dir)
        )
    ).save_pretrained(tmp_path / "clt")
    args = [
        str(tmp_path / "clt"),
        "model.dtype=float32",
        "features.tokens=1200",
        "data.context_size=32",
        "data.eval_docs=2",
        "device=cpu",
    ]
    two_task_array(slurm, tmp_path, "features", [*args, f"features.out={tmp_path / 'array'}"])
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "clt.features",
            *args,
            "features.task=0",
            "features.tasks=1",
            f"features.out={tmp_path / 'single'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = FeatureStore(tmp_path / "array"), FeatureStore(tmp_path / "single")
    assert a.manifest["n_tokens"] == b.manifest["n_tokens"] > 1000
    assert all(a.record(layer, f) == b.record(layer, f) for layer in range(3) for f in range(24))
