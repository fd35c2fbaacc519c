"""Integration: training runs on the bundled corpus with a tiny model, Hydra overrides, exact
resume after a kill, and the configuration errors."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose, tiny_overrides, train_cli

from clt.config import ConfigError, load_config
from clt.errors import CheckpointError
from clt.model import CrossLayerTranscoder
from clt.report import read_metrics
from clt.training import run


def test_300_steps_halve_fvu(tiny_model_dir, tmp_path):
    cfg = compose(
        tiny_overrides(
            tiny_model_dir,
            tmp_path / "run",
            **{
                "trainer.max_steps": 300,
                "trainer.log_every": 1,
                "trainer.ckpt_every": 300,
                "trainer.eval_every": 150,
                "optim.lr": 3e-3,
                "clt.d_sae": 128,
                "clt.k": 8,
                "report": True,
            },
        )
    )
    report = run(cfg)
    fvu = [v for _, v in read_metrics(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")["metrics/fvu"]]
    assert len(fvu) == 300
    assert fvu[-1] <= 0.5 * fvu[0], (fvu[0], fvu[-1])
    # the held-out report and artifacts exist and are sane
    assert len(report["fvu_per_layer"]) == 3 and report["fvu"] < fvu[0]
    assert all(v <= 8 for v in report["l0_per_layer"])
    assert report["eval/ce_loss_zero_ablation"] > report["eval/ce_loss_clean"]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    clt = CrossLayerTranscoder.from_pretrained(tmp_path / "run" / "clt")
    assert clt.arch.d_sae == 128 and clt.arch.n_layers == 3


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk", "relu"])
def test_train_py_with_hydra_overrides(tiny_model_dir, tmp_path, activation):
    out = train_cli(
        tiny_overrides(
            tiny_model_dir,
            tmp_path / "run",
            **{"clt.activation": activation, "clt.d_sae": 48, "trainer.max_steps": 12},
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    clt = CrossLayerTranscoder.from_pretrained(tmp_path / "run" / "clt")
    assert clt.arch.activation == activation and clt.arch.d_sae == 48
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["clt"]["activation"] == activation
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    # throughput of the whole pipeline and of the CLT step alone, which excludes the data's time
    series = read_metrics(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")
    pipeline, step = dict(series["perf/tokens_per_s"]), dict(series["perf/step_tokens_per_s"])
    assert pipeline and all(step[s] >= pipeline[s] > 0 for s in pipeline)


def test_config_group_override(tiny_model_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_model_dir, tmp_path, **{"clt.d_sae": 96}) + ["clt=jumprelu"])
    assert cfg.clt.activation == "jumprelu" and cfg.clt.d_sae == 96


def _weights(run_dir):
    clt = CrossLayerTranscoder.from_pretrained(run_dir / "clt")
    return clt.state_dict()


def test_killed_run_resumes_to_identical_weights(tiny_model_dir, tmp_path):
    extra = {
        "trainer.max_steps": 120,
        "trainer.ckpt_every": 10,
        "trainer.eval_every": 0,
        "clt.activation": "batchtopk",
        "optim.decoder_moments": "bf16",  # (stochastic rounding: its random bits resume too)
    }
    ref = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "ref", **extra))
    assert ref.returncode == 0, ref.stderr[-3000:]

    args = [
        sys.executable,
        str(REPO / "train.py"),
        *tiny_overrides(tiny_model_dir, tmp_path / "run", **extra),
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 10 <= step < 120

    resumed = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert final["global_step"] == 120
    moments = [s["exp_avg_sq"].dtype for s in final["optimizer_states"][0]["state"].values()]
    assert torch.bfloat16 in moments and torch.float32 in moments  # the decoder's, the rest


def test_config_mismatch_on_resume(tiny_model_dir, tmp_path):
    first = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 10}))
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    out = train_cli(
        tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 20, "clt.d_sae": 32})
    )
    assert out.returncode == 2
    assert "config mismatch on resume" in out.stderr and "clt.d_sae: run has 64, now 32" in out.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before  # nothing touched
    # the programmatic path checks too
    cfg = compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"clt.k": 2}))
    with pytest.raises(ConfigError, match="clt.k: run has 4, now 2"):
        run(cfg)


def test_resume_with_only_the_run_dir(tiny_model_dir, tmp_path):
    first = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 10}))
    assert first.returncode == 0, first.stderr[-3000:]
    out = train_cli([f"resume={tmp_path / 'run'}", "trainer.max_steps=14", "report=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 14


def test_unreadable_training_checkpoint(tiny_model_dir, tmp_path):
    first = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 10}))
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"garbage")  # (the newest, step 10)
    cfg = compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 20}))
    with pytest.raises(
        CheckpointError, match="no intact checkpoint .*step 10: step-0000010.ckpt has 7 bytes"
    ):
        run(cfg)
    # a checkpoint from before manifests that does not load is still a clear error
    for p in (tmp_path / "run" / "checkpoints").glob("step-*"):
        p.unlink()
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        run(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"clt.k": 100, "clt.d_sae": 64}, "clt.k=100 is invalid: expected 1 ≤ k ≤ d_sae = 64"),
        ({"clt.d_sae": 0}, "clt.d_sae=0 is invalid"),
        ({"clt.d_sae": -5}, "clt.d_sae=-5 is invalid"),
        ({"clt.activation": "gelu"}, "clt.activation='gelu' is invalid"),
        ({"model.input_hook": "resid_post"}, "model.input_hook='resid_post' is invalid"),
    ],
)
def test_bad_config_values(tiny_model_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **override))


def test_bad_config_on_the_command_line_writes_nothing(tiny_model_dir, tmp_path):
    out = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"clt.k": 100, "clt.d_sae": 64}))
    assert out.returncode == 2 and "clt.k=100 is invalid" in out.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="bad configuration"):
        load_config({"clt": {"d_sea": 10}})


def test_wandb_offline(tiny_model_dir, tmp_path):
    pytest.importorskip("wandb")
    out = train_cli(
        tiny_overrides(tiny_model_dir, tmp_path / "run", **{"trainer.max_steps": 6}) + ["logger=wandb"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_data_error_on_the_command_line_is_clear_and_writes_nothing(tiny_model_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "d.jsonl").write_text('{"body": "hello"}\n')
    out = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"data.dataset": tmp_path / "corpus"}))
    assert out.returncode == 2
    assert "error: text column 'text' not found in the dataset; columns: ['body']" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_family_on_the_command_line(tiny_model_dir, tmp_path):
    out = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **{"model.family": "mamba"}))
    assert out.returncode == 2 and "unknown model family 'mamba'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_bf16_mixed_trains_end_to_end(tiny_model_dir, tmp_path):
    """trainer.precision=bf16-mixed through train.py (fused Adam, gradient clipping on): it trains,
    the saved weights stay fp32, and its FVU ends close to the fp32 run's on the same batches."""
    fvu = {}
    for precision in ("32-true", "bf16-mixed"):
        run_dir = tmp_path / precision
        extra = {"trainer.precision": precision, "trainer.max_steps": 40, "optim.grad_clip": 0.5}
        out = train_cli(tiny_overrides(tiny_model_dir, run_dir, **extra))
        assert out.returncode == 0, out.stderr[-3000:]
        clt = CrossLayerTranscoder.from_pretrained(run_dir / "clt")
        assert all(p.dtype == torch.float32 for p in clt.parameters())
        series = read_metrics(run_dir / "logs" / "version_0" / "metrics.csv")["metrics/fvu"]
        fvu[precision] = sum(v for _, v in series[-3:]) / 3
    assert fvu["32-true"] < 0.9
    assert abs(fvu["bf16-mixed"] - fvu["32-true"]) < 0.05 * fvu["32-true"], fvu
