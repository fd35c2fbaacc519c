"""Experiment presets (conf/experiment/): each composes, validates, fits its mesh, and the table in
docs/training.md says what the files say."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, compose

from clt.data.text import PRESETS
from clt.parallel import mesh_shape

NAMES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_the_issue_s_presets_exist():
    assert {
        "smollm2_topk",
        "smollm2_jumprelu",
        "gpt2_jumprelu_32k",
        "llama3.2_1b_topk",
        "qwen2.5_0.5b_topk",
        "gemma2_2b_jumprelu",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_composes_validates_and_fits_its_mesh(name):
    cfg = compose([f"experiment={name}"])
    t, c = cfg.trainer, cfg.clt
    assert "/" in cfg.model.name_or_path and cfg.data.dataset in PRESETS  # a hub model, a text preset
    shards = (c.feature_shards or t.devices) if c.shard_features else 1
    mesh_shape(t.devices * t.num_nodes, shards, c.d_sae, t.batch_tokens)  # raises if it does not divide
    assert t.max_steps * t.batch_tokens >= 1e8  # a real token budget
    # command-line keys still win over the preset (groups too, for the keys the preset does not set)
    small = compose([f"experiment={name}", "clt.d_sae=64", "trainer.accelerator=cpu", "data=sotu"])
    assert small.clt.d_sae == 64 and small.trainer.accelerator == "cpu" and small.data.dataset == "sotu"


def test_readme_table_matches_the_presets():
    text = (REPO / "docs" / "training.md").read_text()
    rows = {
        m.group(1): [c.strip() for c in m.group(0).strip("|").split("|")]
        for m in re.finditer(r"^\| `([\w.]+)` \|.*\|$", text, re.M)
    }
    assert sorted(rows) == NAMES
    for name, cells in rows.items():
        cfg = compose([f"experiment={name}"])
        _, model, data, act, features, k, lr, batch, tokens, gpus = cells
        assert cfg.model.name_or_path in model and cfg.data.dataset in data and cfg.clt.activation == act
        assert int(features.replace(",", "")) == cfg.clt.d_sae
        assert k == (str(cfg.clt.k) if cfg.clt.activation in ("topk", "batchtopk") else "–")
        assert float(lr) == cfg.optim.lr and int(batch.replace(",", "")) == cfg.trainer.batch_tokens
        assert round(cfg.trainer.max_steps * cfg.trainer.batch_tokens / 1e6) == int(tokens.rstrip("M"))
        assert gpus.startswith(f"{cfg.trainer.num_nodes * cfg.trainer.devices} ")
