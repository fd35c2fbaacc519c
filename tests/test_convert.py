"""TopK / BatchTopK → JumpReLU (clt.convert): held-out L0 per layer within 5% of the target; the
JumpReLU gives the TopK's activations exactly where its thresholds separate the kept features from
the rest; the converted CLT exports to circuit-tracer's layout with its thresholds; the command on
a trained tiny run, with fine-tuning, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides, train_cli

from clt import sparsity as act
from clt.convert import calibrate, layer_l0
from clt.model import CLTArchitecture, CrossLayerTranscoder


def source(activation: str = "topk", scope: str = "layer") -> CrossLayerTranscoder:
    torch.manual_seed(0)
    arch = CLTArchitecture(n_layers=3, d_model=16, d_sae=48, activation=activation, k=4, topk_scope=scope)
    clt = CrossLayerTranscoder(arch)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.05)
        clt.input_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))  # thresholds act on normalised h
    return clt


def activations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, generator=g) * torch.tensor([1.0, 2.0, 0.5])[None, :, None]


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "topk-all"])
def test_calibrated_l0_holds_on_held_out_tokens(kind):
    activation, _, scope = kind.partition("-")
    src = source(activation, scope or "layer")
    cal, held = activations(4000, 1), activations(4000, 2)
    target = torch.tensor([4.0, 2.5, 6.0])
    jr = calibrate(src, cal, target)
    assert jr.arch.activation == "jumprelu" and jr.arch.extra["converted_from"] == activation
    l0 = layer_l0(jr.encode(held), jr.threshold)
    assert ((l0 - target).abs() / target < 0.05).all(), (l0, target)
    jr.eval()
    torch.testing.assert_close((jr(held)[0] > 0).sum(-1).float().mean(0), l0)  # the model's own forward


def test_jumprelu_equals_topk_where_its_thresholds_separate_kept_from_the_rest():
    src = source()
    jr = calibrate(src, activations(4000, 1), torch.full((3,), 4.0))
    x = activations(2000, 3)
    h = src.encode(x)
    a_topk = act.topk(h, 4)  # the reference: the TopK's activations, computed independently
    theta = jr.threshold
    kept = a_topk > 0
    separated = ((h > theta) == kept).all(-1)  # [N, L]: kept above θ, every other feature not
    assert separated.float().mean() > 0.05  # such tokens exist
    jr.eval()
    a = jr(x)[0]
    torch.testing.assert_close(a[separated], a_topk[separated], rtol=0, atol=0)
    assert not torch.equal(a[~separated], a_topk[~separated])  # elsewhere they differ


def test_converted_clt_exports_to_circuit_tracer_with_its_thresholds(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from clt.io import export_circuit_tracer, import_circuit_tracer

    jr = calibrate(source(), activations(2000, 1), torch.full((3,), 4.0))
    export_circuit_tracer(jr, tmp_path / "ct")
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert cfg["activation"] == "jumprelu"
    for layer in range(3):
        theta = load_file(tmp_path / "ct" / f"W_enc_{layer}.safetensors")[f"threshold_{layer}"]
        torch.testing.assert_close(theta, jr.threshold[layer])
    back = import_circuit_tracer(tmp_path / "ct").eval()
    x = activations(100, 4)
    torch.testing.assert_close(back(x)[0], jr.eval()(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~50 s; test_docs_commands runs the command on a trained tiny run in `make test`
def test_convert_command_on_a_trained_run_with_finetuning_and_its_errors(tiny_model_dir, tmp_path):
    run = tmp_path / "topk"
    r = train_cli(tiny_overrides(tiny_model_dir, run, **{"data.eval_docs": 16}))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "jr"
    cmd = [sys.executable, "-m", "clt.convert", str(run), "--to", "jumprelu"]
    r = subprocess.run(
        [*cmd, "--finetune-steps", "3", "--calibration-windows", "150", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "spliced CE" in r.stdout and "after finetune" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["target_l0_per_layer"] == pytest.approx(rep["before"]["l0_per_layer"])
    for got, want in zip(rep["calibration_l0_per_layer"], rep["target_l0_per_layer"]):
        assert abs(got - want) <= 0.05 * want
    # held-out check windows the calibration did not see (after the fine-tuning's recalibration)
    t = torch.tensor(rep["target_l0_per_layer"])
    err = ((torch.tensor(rep["check_l0_per_layer"]) - t).abs() / t).max()
    assert err == pytest.approx(rep["check_l0_max_rel_error"]) and err < 0.05, {
        k: v for k, v in rep.items() if "l0" in k or "tokens" in k
    }
    assert "held-out check tokens" in r.stdout
    assert len(rep["finetune_losses"]) == 3 and "eval/ce_loss_spliced" in rep["after_finetune"]
    clt = CrossLayerTranscoder.from_pretrained(out)  # a run-like directory every tool reads
    assert (
        clt.arch.activation == "jumprelu"
        and json.loads((out / "config.json").read_text())["clt"]["activation"] == "jumprelu"
    )

    def fails(*argv):
        p = subprocess.run([*argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.strip().startswith("error:"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        return p.stderr

    assert "not a finished training run" in fails(*cmd[:3], str(tmp_path), "--to", "jumprelu")
    assert "only TopK and BatchTopK" in fails(
        *cmd[:3], str(out), "--to", "jumprelu", "--out", str(tmp_path / "x")
    )
    assert "--target-l0" in fails(*cmd, "--target-l0", "0", "--out", str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-written
