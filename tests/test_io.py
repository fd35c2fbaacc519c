"""circuit-tracer export/import round trips, the checkpoint loader, and the attribution CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file, save_file

from clt.attribute import main as attribute_main
from clt.cli import main as clt_main
from clt.io import export_circuit_tracer, import_circuit_tracer, load_clt
from clt.model import CheckpointError, CLTArchitecture, CrossLayerTranscoder


def random_clt(
    activation: str,
    log_threshold: bool = False,
    L: int = 3,
    d: int = 32,
    F: int = 40,
    seed: int = 0,
    subject: str = "tiny",
) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(
        CLTArchitecture(
            n_layers=L,
            d_model=d,
            d_sae=F,
            activation=activation,
            k=4,
            log_threshold=log_threshold,
            subject_model=subject,
        ),
        threshold_init=0.05,
    )
    with torch.no_grad():
        clt.input_scale.uniform_(0.3, 3.0)
        clt.output_scale.uniform_(0.3, 3.0)
        clt.b_enc.normal_(0, 0.05)
        clt.b_dec.normal_(0, 0.1)
        clt.batchtopk_threshold.uniform_(0.01, 0.1)
        if activation == "jumprelu":
            t = torch.rand(L, F) * 0.1 + 0.01
            clt.threshold_param.copy_(t.log() if log_threshold else t)
    return clt.eval()


@pytest.mark.parametrize(
    "activation,log_threshold",
    [("topk", False), ("batchtopk", False), ("jumprelu", False), ("jumprelu", True), ("relu", False)],
)
def test_circuit_tracer_round_trip(tmp_path, activation, log_threshold):
    clt = random_clt(activation, log_threshold)
    out = export_circuit_tracer(clt, tmp_path / "ct")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder" and cfg["model_name"] == "tiny"
    assert cfg["feature_input_hook"] == "hook_resid_mid" and cfg["feature_output_hook"] == "hook_mlp_out"
    L, F, d = 3, 40, 32
    for layer in range(L):
        enc = load_file(out / f"W_enc_{layer}.safetensors")
        dec = load_file(out / f"W_dec_{layer}.safetensors")
        assert enc[f"W_enc_{layer}"].shape == (F, d) and enc[f"b_enc_{layer}"].shape == (F,)
        assert enc[f"b_dec_{layer}"].shape == (d,)
        assert dec[f"W_dec_{layer}"].shape == (F, L - layer, d)
        assert (f"threshold_{layer}" in enc) == (activation in ("jumprelu", "batchtopk"))
    back = import_circuit_tracer(out).eval()
    assert back.arch.activation == activation
    assert torch.equal(back.input_scale, torch.ones(L)) and torch.equal(back.output_scale, torch.ones(L))
    x = torch.randn(64, L, d) * 3
    a0, y0 = clt(x)
    a1, y1 = back(x)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert (a0 != 0).any()


def test_foreign_circuit_tracer_files_load_as_jumprelu_or_relu(tmp_path):
    """Files written the way circuit-tracer's own CLTs are (no `clt:` section in config.yaml)."""
    L, F, d = 2, 8, 4
    torch.manual_seed(0)
    for with_theta in (True, False):
        folder = tmp_path / f"ct{with_theta}"
        folder.mkdir()
        W_enc, W_dec = torch.randn(L, F, d), [torch.randn(F, L - i, d) for i in range(L)]
        theta = torch.rand(L, F)
        for i in range(L):
            t = {f"W_enc_{i}": W_enc[i], f"b_enc_{i}": torch.zeros(F), f"b_dec_{i}": torch.zeros(d)}
            if with_theta:
                t[f"threshold_{i}"] = theta[i]
            save_file(t, folder / f"W_enc_{i}.safetensors")
            save_file({f"W_dec_{i}": W_dec[i]}, folder / f"W_dec_{i}.safetensors")
        (folder / "config.yaml").write_text(
            "model_kind: cross_layer_transcoder\nmodel_name: google/gemma-2-2b\n"
            "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
        )
        clt = load_clt(folder).eval()
        assert clt.arch.activation == ("jumprelu" if with_theta else "relu")
        assert clt.arch.subject_model == "google/gemma-2-2b"
        x = torch.randn(5, L, d)
        h = torch.einsum("nld,lfd->nlf", x, W_enc)
        expected = h * (h > theta) if with_theta else h.relu()
        torch.testing.assert_close(clt.encode_activate(x)[1], expected)


def test_bad_exports_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.yaml"):
        import_circuit_tracer(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(CheckpointError, match="expected 'cross_layer_transcoder'"):
        import_circuit_tracer(tmp_path)
    out = export_circuit_tracer(random_clt("topk"), tmp_path / "ct")
    (out / "W_dec_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        import_circuit_tracer(out)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_clt(tmp_path / "nope")


def test_load_clt_accepts_run_dir_native_dir_and_export(tmp_path):
    clt = random_clt("jumprelu")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a run dir also holds the training config
    clt.save_pretrained(tmp_path / "run" / "clt")
    export_circuit_tracer(clt, tmp_path / "ct")
    x = torch.randn(7, 3, 32)
    for path in (tmp_path / "run", tmp_path / "run" / "clt", tmp_path / "ct"):
        torch.testing.assert_close(load_clt(path).eval()(x)[1], clt(x)[1], rtol=1e-5, atol=1e-6)


def test_clt_command_exports_and_imports(tmp_path):
    clt = random_clt("batchtopk")
    clt.save_pretrained(tmp_path / "native")
    assert (
        clt_main(
            ["export-circuit-tracer", str(tmp_path / "native"), str(tmp_path / "ct"), "--dtype", "bfloat16"]
        )
        == 0
    )
    assert load_file(tmp_path / "ct" / "W_dec_0.safetensors")["W_dec_0"].dtype == torch.bfloat16
    assert clt_main(["import-circuit-tracer", str(tmp_path / "ct"), str(tmp_path / "back")]) == 0
    back = CrossLayerTranscoder.from_pretrained(tmp_path / "back").eval()
    x = torch.randn(9, 3, 32)
    torch.testing.assert_close(back(x)[1], clt(x)[1], rtol=2e-2, atol=2e-2)  # through bf16
    assert clt_main(["nonsense"]) == 2


# ---------------------------------------------------------------------------------------------
# python -m clt.attribute


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory):
    clt = CrossLayerTranscoder(
        CLTArchitecture(
            n_layers=3, d_model=32, d_sae=48, activation="topk", k=3, subject_model=str(tiny_model_dir)
        )
    )
    out = tmp_path_factory.mktemp("ckpt") / "clt"
    clt.save_pretrained(out)
    return out


def test_attribute_cli_writes_graph_files_and_prints_top_features(tiny_checkpoint, tmp_path):
    out = tmp_path / "graph"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clt.attribute",
            str(tiny_checkpoint),
            "The capital of France is",
            "--out",
            str(out),
            "--batch-size",
            "16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("graph.pt", "graph.json", "graph-metadata.json", "graph.png", "scores.json"):
        assert (out / name).stat().st_size > 0, name
    assert "top direct feature inputs" in proc.stdout and "replacement" in proc.stdout
    data = json.loads((out / "graph.json").read_text())
    assert data["metadata"]["prompt"] == "The capital of France is" and data["nodes"] and data["links"]
    s = json.loads((out / "scores.json").read_text())
    assert 0 <= s["full/replacement_score"] <= 1
    from PIL import Image

    assert Image.open(out / "graph.png").size[0] > 500


def test_attribute_cli_bad_input(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "g"

    def run(*args):
        code = attribute_main([*args, "--out", str(out)])
        return code, capsys.readouterr().err

    code, err = run(str(tiny_checkpoint), "hello", "--node-threshold", "1.5")
    assert code == 2 and "node_threshold must be in (0, 1]" in err
    code, err = run(str(tiny_checkpoint), "hello", "--edge-threshold", "0")
    assert code == 2 and "edge_threshold must be in (0, 1]" in err
    code, err = run(str(tiny_checkpoint), "   ")
    assert code == 2 and "empty" in err
    code, err = run(str(tiny_checkpoint), "word " * 600)
    assert code == 2 and "context is 512 tokens" in err
    other = random_clt("topk", d=64, subject=str(tiny_checkpoint.parent))
    other.arch.subject_model = json.loads((tiny_checkpoint / "config.json").read_text())["architecture"][
        "subject_model"
    ]
    other.save_pretrained(tmp_path / "other")
    code, err = run(str(tmp_path / "other"), "hello")
    assert code == 2 and "wrong checkpoint" in err
    code, err = run(str(tmp_path / "missing"), "hello")
    assert code == 2 and "no checkpoint" in err
    assert not out.exists()  # nothing written on bad input


def test_attribute_cards_for_the_graph_features_only(tiny_checkpoint, tmp_path, capsys):
    """--cards computes the cards of the graph's feature nodes into the store next to the CLT, the
    graph file's scan points at that store, and a second run finds them there (no recomputation)."""
    import shutil

    from clt.features import FeatureStore

    ckpt = tmp_path / "clt"
    shutil.copytree(tiny_checkpoint, ckpt)
    out = tmp_path / "g"
    args = [
        str(ckpt),
        "The capital of France is",
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--no-plot",
        "--cards",
        "--cards-tokens",
        "1500",
        "--node-threshold",
        "1",
        "--edge-threshold",
        "1",
    ]
    assert attribute_main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "graph.json").read_text())
    store = ckpt / "features"
    assert data["metadata"]["scan"] == str(store.resolve()) and data["metadata"]["scan"].startswith("/")
    st = FeatureStore(store)
    feats = {
        (int(n["layer"]), int(n["node_id"].split("_")[1]))
        for n in data["nodes"]
        if n["feature_type"] == "cross layer transcoder"
    }
    assert feats and all(st.has(layer, f) for layer, f in feats)
    present = sum(len(p) for p in st.present())
    assert present < 3 * 48 and not st.manifest["complete"]  # only the graph's features
    for layer, f in feats:
        card = st.card(layer, f)
        assert card.n_tokens == st.manifest["n_tokens"] > 1000 and card.layer == layer and card.feature == f
    before = (store / "manifest.json").stat().st_mtime_ns
    assert attribute_main(args) == 0
    assert (store / "manifest.json").stat().st_mtime_ns == before  # nothing left to compute
    # a CLT from the Hub has no local store: --cards says what to pass
    assert attribute_main(["alice/none", "hello", "--out", str(tmp_path / "h"), "--cards"]) == 2


def test_checkpoints_written_before_decode_left_the_architecture_still_load(tmp_path):
    """tests/assets/clt-format1*: written by the code of 2026-12-02 whose architecture still saved
    the `decode` speed switch; they load (native and circuit-tracer export), give the outputs
    recorded then, and a re-save no longer stores the switch."""
    assets = REPO / "tests" / "assets"
    io = torch.load(assets / "clt-format1-io.pt", weights_only=True)
    assert (
        json.loads((assets / "clt-format1" / "config.json").read_text())["architecture"]["decode"] == "dense"
    )
    for path in ("clt-format1", "clt-format1-circuit-tracer"):
        clt = load_clt(assets / path)
        assert not hasattr(clt.arch, "decode") and clt.decode_path == "auto"
        a, y = clt(io["x"])
        torch.testing.assert_close(a, io["a"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, io["y"], rtol=1e-5, atol=1e-6)
    clt.save_pretrained(tmp_path / "new")
    assert "decode" not in json.loads((tmp_path / "new" / "config.json").read_text())["architecture"]
