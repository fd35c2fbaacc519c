"""Hugging Face Hub push/pull against a local server implementing the Hub endpoints huggingface_hub
uses (tests/hub_server.py, through HF_ENDPOINT): training pushes at the end (hub.repo_id), every file
arrives byte-identical, the model card renders the run's metrics, from_pretrained loads the same
CLT (revision, subfolder, offline cache), and bad repo ids or revisions are clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import REPO, tiny_overrides, train_cli
from hub_server import FakeHub, hub_env

from clt.io import export_circuit_tracer, load_clt


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


LOAD = """
    import sys, torch
    from clt.model import CrossLayerTranscoder
    clt = CrossLayerTranscoder.from_pretrained({repo!r}, {kw})
    torch.manual_seed(0)
    x = torch.randn(64, clt.n_layers, clt.arch.d_model) * 3
    torch.save(clt(x), {out!r})
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny run trained with report=True that pushes to the local Hub at the end."""
    tmp = tmp_path_factory.mktemp("hub")
    with FakeHub() as hub:
        run = tmp / "run"
        done = train_cli(
            tiny_overrides(tiny_model_dir, run, report=True, **{"hub.repo_id": "alice/tiny-clt"}),
            env=hub_env(hub, tmp),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield hub, run, tmp, done.stdout


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_training_pushes_every_file_byte_identical(trained):
    hub, run, tmp, out = trained
    assert "pushed to the Hub: " in out and "alice/tiny-clt/commit/" in out
    files = hub.files("alice/tiny-clt")
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "report.json",
        "loss_curve.png",
        "training_config.json",
        "circuit_tracer/config.yaml",
    } <= set(files)
    for local, remote in (
        ("clt/config.json", "config.json"),
        ("clt/model.safetensors", "model.safetensors"),
        ("report.json", "report.json"),
        ("loss_curve.png", "loss_curve.png"),
        ("config.json", "training_config.json"),
    ):
        assert files[remote] == (run / local).read_bytes(), remote
    # the circuit-tracer files are what exporting the run's CLT here writes
    export_circuit_tracer(load_clt(run), tmp / "export")
    for f in (tmp / "export").iterdir():
        assert files[f"circuit_tracer/{f.name}"] == f.read_bytes(), f.name


def test_model_card_renders_the_run_metrics(trained):
    hub, run, _, _ = trained
    card = hub.files("alice/tiny-clt")["README.md"].decode()
    report = json.loads((run / "report.json").read_text())
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "clt" and "cross-layer-transcoder" in front["tags"]
    assert front["clt_metrics"]["fvu"] == pytest.approx(report["fvu"], rel=1e-5)
    assert front["clt_metrics"]["ce_loss_score"] == pytest.approx(report["eval/ce_loss_score"], rel=1e-5)
    for layer, (fvu, l0) in enumerate(zip(report["fvu_per_layer"], report["l0_per_layer"])):
        assert f"| {layer} | {fvu:.4f} | {l0:.1f} |" in card
    assert f"{report['eval/ce_loss_score']:.3f} |" in card
    assert "resid_mid" in card and "mlp_out" in card and str(run.parent) not in card.split("## Training")[0]
    assert 'CrossLayerTranscoder.from_pretrained("alice/tiny-clt")' in card


def test_from_pretrained_downloads_the_same_clt(trained):
    hub, run, tmp, _ = trained
    env = hub_env(hub, tmp)
    ref_clt = load_clt(run)
    torch.manual_seed(0)
    x = torch.randn(64, ref_clt.n_layers, ref_clt.arch.d_model) * 3
    ref = ref_clt(x)
    for kw, name, exact in (("", "native", True), ("subfolder='circuit_tracer'", "ct", False)):
        out = tmp / f"{name}.pt"
        done = python(LOAD.format(repo="alice/tiny-clt", kw=kw, out=str(out)), env)
        assert done.returncode == 0, done.stderr[-3000:]
        got = torch.load(out)
        for g, r in zip(got, ref):
            if exact:  # the same bytes: identical outputs
                assert torch.equal(g, r)
            else:  # normalisation folded into the weights: equal to float rounding
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the downloaded files in huggingface_hub's cache are the pushed bytes
    cached = list((tmp / "hf" / "hub").rglob("model.safetensors"))
    assert cached and cached[0].read_bytes() == (run / "clt" / "model.safetensors").read_bytes()
    # offline: from the local cache only, with the Hub unreachable
    out = tmp / "offline.pt"
    done = python(
        LOAD.format(repo="alice/tiny-clt", kw="", out=str(out)),
        env | {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(torch.equal(g, r) for g, r in zip(torch.load(out), ref))


def test_push_cli_revision_and_errors(trained, tmp_path):
    hub, run, _, _ = trained
    env = hub_env(hub, tmp_path)
    # python -m clt.push of a native checkpoint dir to a branch: main keeps the training push
    clt = load_clt(run)
    with torch.no_grad():
        clt.b_dec.add_(1.0)
    clt.save_pretrained(tmp_path / "edited")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clt.push",
            str(tmp_path / "edited"),
            "alice/tiny-clt",
            "--revision",
            "dev",
            "--no-export",
        ],
        cwd=REPO,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dev, main = hub.files("alice/tiny-clt", "dev"), hub.files("alice/tiny-clt", "main")
    assert dev["model.safetensors"] == (tmp_path / "edited" / "model.safetensors").read_bytes()
    assert main["model.safetensors"] == (run / "clt" / "model.safetensors").read_bytes()
    code = """
        from clt.model import CrossLayerTranscoder
        a = CrossLayerTranscoder.from_pretrained("alice/tiny-clt", revision="dev")
        b = CrossLayerTranscoder.from_pretrained("alice/tiny-clt")
        print(float((a.b_dec - b.b_dec).mean()))
    """
    done = python(code, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(1.0)
    # bad input: clear errors from the loader, not tracebacks from HTTP
    for repo, kw, msg in (
        ("alice/missing", "", "no CLT at alice/missing: no such local directory, and no such Hub repo"),
        ("alice/tiny-clt", "revision='nope'", "no revision 'nope' in alice/tiny-clt"),
        ("alice/tiny-clt", "subfolder='nothing'", "alice/tiny-clt/nothing holds no CLT"),
    ):
        done = python(
            f"""
            from clt.model import CrossLayerTranscoder, CheckpointError
            try:
                CrossLayerTranscoder.from_pretrained({repo!r}, {kw})
            except CheckpointError as e:
                print("ERR", e)
        """,
            env,
        )
        assert f"ERR {msg}" in done.stdout, done.stdout + done.stderr[-2000:]
    # not cached and offline
    done = python(
        """
        from clt.model import CrossLayerTranscoder, CheckpointError
        try:
            CrossLayerTranscoder.from_pretrained("alice/never-downloaded")
        except CheckpointError as e:
            print("ERR", e)
    """,
        env | {"HF_HUB_OFFLINE": "1"},
    )
    assert "no such local directory, and not in the local Hugging Face cache" in done.stdout, (
        done.stdout + done.stderr[-2000:]
    )


def test_push_uploads_the_feature_cards_and_the_hub_clt_finds_them(trained, tmp_path):
    import shutil

    from clt.config import DataConfig, FeaturesConfig, FeaturesJobConfig, ModelConfig
    from clt.features import FeatureStore
    from clt.features.pipeline import compute_store

    hub, run, _, _ = trained
    env = hub_env(hub, tmp_path)
    local = tmp_path / "run"
    shutil.copytree(run, local)
    job = FeaturesJobConfig(
        model=ModelConfig(name_or_path="", dtype="float32"),
        data=DataConfig(context_size=32, eval_docs=2),
        features=FeaturesConfig(checkpoint=str(local), tokens=1500, task=0, tasks=1),
    )
    store = compute_store(job.validate(), progress=False)
    assert store == local / "features"
    done = subprocess.run(
        [sys.executable, "-m", "clt.push", str(local), "alice/tiny-cards", "--no-export"],
        cwd=REPO,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = hub.files("alice/tiny-cards")
    for f in store.iterdir():
        assert files[f"features/{f.name}"] == f.read_bytes(), f.name
    assert 'FeatureStore.of("alice/tiny-cards")' in files["README.md"].decode()
    want = FeatureStore(store).record(1, 2)
    done = python(
        """
        import json
        from clt.features import FeatureStore
        print("CARD", json.dumps(FeatureStore.of("alice/tiny-cards").record(1, 2)))
        try:
            FeatureStore.of("alice/tiny-clt")
        except Exception as e:
            print("ERR", e)
    """,
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.split("CARD ", 1)[1].splitlines()[0]) == want
    assert "ERR alice/tiny-clt has no feature cards" in done.stdout
