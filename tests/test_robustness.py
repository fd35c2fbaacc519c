"""Long runs meet faults (issue: NaNs, flaky streams, full disks, torn checkpoints, two writers,
signals, missing things). Each test injects the fault and asserts what the trainer does exactly."""

import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides, train_cli

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override,needles",
    [
        ({"model.name_or_path": "/no/such/model"}, ["model.name_or_path='/no/such/model'", "no such directory"]),
        (
            {"model.name_or_path": "someorg/not-cached"},
            ["model.name_or_path='someorg/not-cached'", "not in the Hugging Face cache", "HF_HUB_OFFLINE=1"],
        ),
        (
            {"data.dataset": "someorg/no-dataset"},
            ["data.dataset='someorg/no-dataset'", "HF_HUB_OFFLINE=1", "--repo-type dataset"],
        ),
        ({"data.dataset": "./no/such/corpus"}, ["data.dataset='./no/such/corpus'", "no such file or directory"]),
    ],
    ids=["local-model", "hub-model", "hub-dataset", "local-dataset"],
)
def test_missing_things_are_one_line_user_errors(tiny_model_dir, tmp_path, override, needles):
    env = OFFLINE | {"HF_HOME": str(tmp_path / "empty-cache")}
    out = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **override), env=env)
    _one_line_error(out, *needles)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("model", ["/no/such/model", "someorg/not-cached"])
def test_attribute_with_a_missing_model_is_a_user_error(viewer_folder, tmp_path, model):
    clt_dir = viewer_folder.clt
    env = OFFLINE | {"HF_HOME": str(tmp_path / "empty-cache")}
    cmd = [sys.executable, "-m", "clt.attribute", str(clt_dir), "hello", "--model", model]
    cmd += ["--out", str(tmp_path / "graphs")]
    import os

    out = subprocess.run(cmd, cwd=REPO, env=os.environ | env, capture_output=True, text=True, timeout=300)
    _one_line_error(out, f"--model={model!r}")
    assert not (tmp_path / "graphs").exists()
