"""Every command the README shows runs (with tiny settings: the tiny model and CLT instead of the
demo's, a few steps): a command the README gains without a case here fails the test."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import circuits_cli, served_graphs, tiny_overrides, train_cli

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_every_readme_command_runs(viewer_folder, tiny_model_dir, tmp_path):
    commands = readme_commands()
    assert len(commands) >= 5
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[:1] == ["make"]:  # the quick start: its targets exist and the demo ends with the viewer
            dry = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True)
            assert dry.returncode == 0, dry.stderr
            if argv[1] == "demo":
                assert "clt.attribute runs/demo" in dry.stdout and "clt serve runs/demo/graphs" in dry.stdout
        elif argv[:2] == [".venv/bin/clt", "serve"]:
            assert argv[2] == "runs/demo/graphs"
            assert b"capitals" in served_graphs(viewer_folder.folder)
        elif argv[:2] == [".venv/bin/clt", "attribute"]:
            assert argv[2] == "runs/demo"
            args = [
                str(viewer_folder.clt),
                argv[3],
                *[str(tmp_path / "paris") if a == "runs/paris" else a for a in argv[4:]],
                "--batch-size",
                "16",
                "--no-plot",
            ]
            done = subprocess.run(
                [sys.executable, "-m", "clt.cli", "attribute", *args],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            assert (tmp_path / "paris" / "graph.pt").exists()
        elif argv[:2] in ([".venv/bin/clt", "heads"], [".venv/bin/clt", "pinpoint"]):  # the tiny model
            assert argv[2] == "bundled:smollm2-135m-instruct"
            out = tmp_path / argv[1]
            done = subprocess.run(
                circuits_cli(argv, tiny_model_dir, out),
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert any(out.iterdir())
        elif argv[:2] in ([".venv/bin/python", "train.py"], [".venv/bin/clt", "train"]):
            over = dict(o.split("=", 1) for o in tiny_overrides(tiny_model_dir, tmp_path / "run"))
            over |= dict(a.split("=", 1) for a in argv[2:])
            over["trainer.max_steps"] = "4"  # tiny settings
            overrides = [f"{k}={v}" for k, v in over.items()]
            if argv[1] == "train.py":
                done = train_cli(overrides)
            else:  # the front door execs train.py
                done = subprocess.run(
                    [sys.executable, "-m", "clt.cli", "train", *overrides],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
            assert done.returncode == 0, done.stderr[-3000:]
            assert (tmp_path / "run" / "clt" / "config.json").exists()
        else:
            raise AssertionError(f"the README shows a command this test does not run: {cmd}")
