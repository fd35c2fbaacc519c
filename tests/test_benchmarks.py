"""The roofline benchmark runs end to end on a tiny shape and records every component."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("activation", [pytest.param("topk", marks=pytest.mark.slow), "jumprelu"])
def test_roofline_runs_on_a_tiny_shape(tmp_path, activation):
    out = tmp_path / "roofline.jsonl"
    shape = ["--layers", "3", "--d", "16", "--d-sae", "64", "--k", "4", "--tokens", "64", "--reps", "1"]
    cmd = [sys.executable, "benchmarks/roofline.py", *shape, "--activation", activation, "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    parts = {"encoder_forward", "selection", "decode_forward", "decode_backward", "encoder_weight_grad"}
    assert parts | {"optimizer", "grad_norm"} == set(rec["components"])
    # (a component timed as a difference, the decode backward, can come out ≤ 0 at this size)
    assert all(c["bound_ms"] > 0 and c["ms"] == c["ms"] for c in rec["components"].values())
    assert rec["components"]["encoder_forward"]["ms"] > 0
    assert rec["step_ms"] > 0 and rec["device"].startswith("cpu (") and 0 < rec["gradient_support"] < 1
    assert "whole step" in r.stdout
