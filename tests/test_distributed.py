"""`python train.py trainer=ddp …` with 2 CPU processes (gloo), end to end through Lightning:
feature-sharded training equals one process step for step (both ranks read the same batches), a
sharded checkpoint resumes in one process, data-parallel runs checkpoint every replica's data
position and resume with another world size; bad meshes are clear errors before any process starts."""

from __future__ import annotations

import torch
from conftest import tiny_overrides, train_cli

from clt.io import load_clt

TWO = {"trainer": "ddp", "trainer.num_threads": 1}


def _run(model_dir, run_dir, **extra):
    done = train_cli(tiny_overrides(model_dir, run_dir, **{"trainer.num_threads": 1, **extra}))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_clt(a_dir, b_dir, rtol=1e-5):
    a, b = load_clt(a_dir), load_clt(b_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-6, msg=name)


def test_feature_sharded_training_equals_one_process_and_resumes_anywhere(tiny_model_dir, tmp_path):
    # 2 shards of d_sae=64: every rank holds 32 features of each layer; 20 steps, checkpoint at 10, 20
    _run(tiny_model_dir, tmp_path / "sharded", **TWO, **{"clt.shard_features": "true"})
    ckpts = sorted(p.name for p in (tmp_path / "sharded" / "checkpoints").iterdir())
    assert [n for n in ckpts if n.startswith("last")] == [
        "last.ckpt",
        "last.shard-000-of-002.ckpt",
        "last.shard-001-of-002.ckpt",
    ]
    assert {"step-0000020.sha256", "step-0000020.shard-001-of-002.ckpt", "step-0000010.ckpt"} <= set(ckpts)
    assert sorted(p.name for p in (tmp_path / "sharded" / "clt").iterdir()) == [
        "shard-000-of-002",
        "shard-001-of-002",
    ]
    _run(tiny_model_dir, tmp_path / "single")
    _assert_same_clt(tmp_path / "sharded" / "clt", tmp_path / "single" / "clt")  # reassembled shards

    # the sharded training state (weights, Adam moments, dead-feature counters) continues in 1 process
    _run(
        tiny_model_dir,
        tmp_path / "sharded",
        **{
            "trainer.max_steps": 30,
            "trainer.devices": 1,
            "trainer.strategy": "auto",
            "clt.shard_features": "false",
        },
    )
    _run(tiny_model_dir, tmp_path / "single", **{"trainer.max_steps": 30})
    _assert_same_clt(tmp_path / "sharded" / "clt", tmp_path / "single" / "clt")
    ckpts = sorted(p.name for p in (tmp_path / "sharded" / "checkpoints").iterdir())
    assert [n for n in ckpts if n.startswith("last")] == ["last.ckpt"]  # the 1-process save
    assert "step-0000030.ckpt" in ckpts and not any(n.startswith("step-0000030.shard") for n in ckpts)


def test_data_parallel_checkpoints_every_replica_and_resumes_with_another_world(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "dp"
    _run(tiny_model_dir, run_dir, **TWO)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    positions = state["clt_data_positions"]
    assert len(positions) == 2 and positions[0] != positions[1]  # disjoint text shards
    assert state["global_step"] == 20
    full = load_clt(run_dir / "clt")
    assert full.d_sae == 64

    done = _run(
        tiny_model_dir, run_dir, **{"trainer.max_steps": 30, "trainer.devices": 1, "trainer.strategy": "auto"}
    )
    assert "resuming 2 data-parallel replicas as 1" in done.stderr
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 30 and len(state["clt_data_positions"]) == 1
    assert state["clt_data_positions"][0]["text"]["offset"] > 0  # past every document already read


def test_bad_meshes_are_clear_errors_before_launching(tiny_model_dir, tmp_path):
    cases = [
        (
            {"clt.shard_features": "true", "clt.d_sae": 63},
            "clt.d_sae=63 is not divisible by the 2 feature shards",
        ),
        (
            {"clt.shard_features": "true", "clt.feature_shards": 3},
            "3 feature shards do not divide the 2 processes",
        ),
        ({"trainer.batch_tokens": 127}, "not divisible by the 2 data-parallel replicas"),
    ]
    for extra, message in cases:
        run_dir = tmp_path / f"bad{len(extra)}{list(extra.values())[-1]}"
        done = train_cli(tiny_overrides(tiny_model_dir, run_dir, **TWO, **extra))
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr
        assert "Traceback" not in done.stderr and not run_dir.exists()
