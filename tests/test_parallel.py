"""Feature-sharded CLT on 2 CPU processes (gloo): the same forward outputs, losses and gradients as
the unsharded CLT on the same batch, for TopK, BatchTopK and JumpReLU; shards reassemble into the
full CLT; a feature count that the shards do not divide is a clear error."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clt.config import TrainConfig
from clt.model import CLTArchitecture
from clt.parallel import Parallel, ShardingError, shard_clt, unshard_clt
from clt.training import CLTModule

L, D, F = 3, 16, 32


def module(activation: str) -> CLTModule:
    """activation: topk | batchtopk | jumprelu, or topk-all / batchtopk-all (clt.topk_scope=all)."""
    activation, _, scope = activation.partition("-")
    cfg = TrainConfig()
    cfg.clt.activation, cfg.clt.d_sae, cfg.clt.k = activation, F, 3
    cfg.clt.topk_scope = scope or "layer"
    cfg.clt.sparsity_coeff, cfg.clt.preact_coeff, cfg.clt.auxk_k = 1e-2, 1e-3, 4
    cfg.trainer.max_steps = 10
    torch.manual_seed(0)
    scope = scope or "layer"
    arch = CLTArchitecture(n_layers=L, d_model=D, d_sae=F, activation=activation, k=3, topk_scope=scope)
    m = CLTModule(cfg, arch)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, L, D, generator=g), torch.randn(64, L, D, generator=g)
    m.initialize_from_data(x, y)
    with torch.no_grad():  # every parameter matters: non-zero encoder biases, some dead features
        m.clt.b_enc.normal_(0, 0.1, generator=g)
        m.tokens_since_fired[:, ::5] = 10**9
    return m


def _worker(rank: int, world: int, init: str, activation: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(40, L, D, generator=g) * 2, torch.randn(40, L, D, generator=g)
        full = module(activation)
        full.train()
        ref_loss, ref_logs = full.loss(x, y)
        ref_loss.backward()
        ref_y = full.clt.decode_normalized(full.clt.encode_activate(x)[1]).detach()

        sharded = module(activation)
        lo, hi = rank * F // world, (rank + 1) * F // world
        sharded.clt = shard_clt(sharded.clt, rank, world)
        sharded.tokens_since_fired = sharded.tokens_since_fired[:, lo:hi].clone()
        sharded.mesh = Parallel(sharded=True, select_group=None)
        sharded.clt.mesh = sharded.mesh
        sharded.train()
        loss, logs = sharded.loss(x, y)
        loss.backward()
        y_hat = sharded.clt.decode_normalized(sharded.clt.encode_activate(x)[1]).detach()

        torch.testing.assert_close(y_hat, ref_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        for k in (
            "losses/mse",
            "losses/auxk",
            "losses/sparsity",
            "losses/preact",
            "metrics/l0",
            "sparsity/dead_fraction",
        ):
            if k in ref_logs:
                torch.testing.assert_close(
                    torch.as_tensor(logs[k]).float(),
                    torch.as_tensor(ref_logs[k]).float(),
                    rtol=1e-5,
                    atol=1e-7,
                    msg=k,
                )
        if activation.startswith(("topk", "batchtopk")):
            assert float(ref_logs["losses/auxk"]) > 0  # AuxK ran, across shards
        p, r = sharded.clt, full.clt
        torch.testing.assert_close(p.W_enc.grad, r.W_enc.grad[:, lo:hi], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.b_enc.grad, r.b_enc.grad[:, lo:hi], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.b_dec.grad, r.b_dec.grad, rtol=1e-4, atol=1e-7)
        for s in range(L):
            torch.testing.assert_close(p.W_dec[s].grad, r.W_dec[s].grad[lo:hi], rtol=1e-4, atol=1e-7)
        if activation == "jumprelu":
            torch.testing.assert_close(
                p.threshold_param.grad, r.threshold_param.grad[:, lo:hi], rtol=1e-4, atol=1e-7
            )
        if activation == "batchtopk" or activation.endswith("-all"):  # the inference thresholds' input
            torch.testing.assert_close(p.batchtopk_min_kept, r.batchtopk_min_kept, equal_nan=True)
        if activation.endswith("-all"):  # the selection crossed layers (not k per layer)
            counts = (full.clt.encode_activate(x)[1] > 0).sum(-1)
            assert len(set(counts.flatten().tolist())) > 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "topk-all", "batchtopk-all"])
def test_feature_sharded_step_matches_unsharded(activation, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", activation), nprocs=2, join=True)


def test_shards_reassemble_and_bad_divisor_is_an_error():
    full = module("jumprelu").clt.eval()
    shards = [shard_clt(full, r, 4) for r in range(4)]
    assert shards[1].d_sae == F // 4 and shards[1].arch.extra["shard"] == {"rank": 1, "world": 4, "d_sae": F}
    back = unshard_clt(shards)
    x = torch.randn(8, L, D)
    torch.testing.assert_close(back(x)[1], full(x)[1])
    with pytest.raises(ShardingError, match="not divisible by the 3 feature shards"):
        shard_clt(full, 0, 3)
    with pytest.raises(ShardingError, match="rank order"):
        unshard_clt(shards[::-1])


def test_sharded_checkpoint_loads_into_any_world_size_and_one_process(tmp_path):
    from clt.io import load_clt, load_sharded, save_sharded

    full = module("topk").clt.eval()
    for r in range(4):
        save_sharded(shard_clt(full, r, 4), tmp_path / "clt")
    x = torch.randn(8, L, D)
    torch.testing.assert_close(load_clt(tmp_path).eval()(x)[1], full(x)[1])  # run dir -> clt/ -> shards
    two = [load_sharded(tmp_path / "clt", r, 2) for r in range(2)]
    assert two[0].d_sae == F // 2
    torch.testing.assert_close(unshard_clt(two).eval()(x)[1], full(x)[1])
    with pytest.raises(ShardingError, match="not divisible"):
        load_sharded(tmp_path / "clt", 0, 5)
    import shutil

    shutil.rmtree(tmp_path / "clt" / "shard-002-of-004")
    with pytest.raises(ShardingError, match=r"shards \[2\] of 4 are missing"):
        load_sharded(tmp_path / "clt")
    save_sharded(shard_clt(full, 0, 2), tmp_path / "clt")
    with pytest.raises(ShardingError, match="one sharding"):
        load_sharded(tmp_path / "clt")


def _dp_worker(rank: int, world: int, init: str, activation: str, steps: int) -> None:
    """Data parallel by hand (gradients averaged over the replicas, as DDP does) vs one process on
    the same global batches."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ref, dp = module(activation), module(activation)
        dp.mesh = Parallel(data_parallel=True)
        dp.clt.mesh = dp.mesh
        for m in (ref, dp):
            m.cfg.clt.dead_after_tokens = 200  # some features die and revive during the run
            m.train()
        opts = [torch.optim.Adam(m.clt.parameters(), lr=3e-3) for m in (ref, dp)]
        g = torch.Generator().manual_seed(3)
        n = 24
        for step in range(steps):
            x, y = torch.randn(world * n, L, D, generator=g) * 2, torch.randn(world * n, L, D, generator=g)
            mine = slice(rank * n, (rank + 1) * n)
            loss_ref, logs_ref = ref.loss(x, y)
            loss_dp, logs_dp = dp.loss(x[mine], y[mine])
            for m, loss, opt in ((ref, loss_ref, opts[0]), (dp, loss_dp, opts[1])):
                opt.zero_grad()
                loss.backward()
                if m is dp:
                    for p in m.clt.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world
                opt.step()
            for k in ("metrics/fvu", "metrics/l0", "losses/auxk"):
                if k in logs_ref:
                    torch.testing.assert_close(
                        torch.as_tensor(logs_dp[k]).float(),
                        torch.as_tensor(logs_ref[k]).float(),
                        rtol=1e-4,
                        atol=1e-6,
                        msg=f"{k} at step {step}",
                    )
        assert torch.equal(dp.tokens_since_fired, ref.tokens_since_fired)
        for (name, p), q in zip(dp.clt.named_parameters(), ref.clt.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(dp.clt.batchtopk_threshold, ref.clt.batchtopk_threshold)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_data_parallel_steps_match_one_process_on_the_global_batches(activation, tmp_path):
    mp.spawn(_dp_worker, args=(2, f"file://{tmp_path}/rendezvous", activation, 8), nprocs=2, join=True)


def test_training_checkpoint_reshards_and_rejects_inconsistent_shards(tmp_path):
    """Lightning-style training state (module state + Adam moments) of 2 shards -> 4 shards and
    -> 1 process equals slicing the unsharded state; a missing shard or a shard from another save
    is a clear error."""
    from clt.parallel import load_training_state, shard_checkpoint

    m = module("jumprelu")
    names = [f"clt.{n}" for n, _ in m.clt.named_parameters()]
    opt = torch.optim.Adam(m.clt.parameters())
    x = torch.randn(16, L, D)
    m.loss(x, x)[0].backward()
    opt.step()
    full = {"global_step": 7, "state_dict": m.state_dict(), "optimizer_states": [opt.state_dict()]}

    def sliced(state, rank, world):  # the reference: narrow every feature dimension by hand
        lo, hi = rank * F // world, (rank + 1) * F // world
        sd = {
            k: (
                v[:, lo:hi]
                if k in ("clt.W_enc", "clt.b_enc", "clt.threshold_param", "tokens_since_fired")
                else v[lo:hi]
                if k.startswith("clt.W_dec.")
                else v
            )
            for k, v in state["state_dict"].items()
        }
        opt_state = {}
        for i, st in state["optimizer_states"][0]["state"].items():
            n = names[i]
            cut = (
                (lambda v: v[:, lo:hi])
                if n in ("clt.W_enc", "clt.b_enc", "clt.threshold_param")
                else (lambda v: v[lo:hi])
                if n.startswith("clt.W_dec.")
                else (lambda v: v)
            )
            opt_state[i] = {k: cut(v) if k != "step" else v for k, v in st.items()}
        return sd, opt_state

    path = tmp_path / "last.ckpt"
    for r in range(2):  # a 2-shard save, as CLTStrategy writes it
        sd, st = sliced(full, r, 2)
        torch.save(
            {
                "global_step": 7,
                "state_dict": sd,
                "optimizer_states": [{**opt.state_dict(), "state": st}],
                "clt_shard": {"rank": r, "world": 2},
            },
            shard_checkpoint(path, r, 2),
        )
    index = {"global_step": 7, "clt_feature_shards": 2}
    for rank, world in ((0, 1), (1, 4), (3, 4), (1, 2)):
        got = load_training_state(index, path, names, rank, world)
        sd, st = sliced(full, rank, world)
        for k, v in sd.items():
            torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=0, msg=k)
        for i, s in st.items():
            for k, v in s.items():
                torch.testing.assert_close(got["optimizer_states"][0]["state"][i][k], v, rtol=0, atol=0)

    with pytest.raises(ShardingError, match="not divisible by 3 shards"):
        load_training_state(index, path, names, 0, 3)
    stale = torch.load(shard_checkpoint(path, 1, 2), weights_only=False) | {"global_step": 5}
    torch.save(stale, shard_checkpoint(path, 1, 2))
    with pytest.raises(ShardingError, match="come from different saves"):
        load_training_state(index, path, names, 0, 1)
    shard_checkpoint(path, 1, 2).unlink()
    with pytest.raises(
        ShardingError, match="written by 2 feature shards but last.shard-001-of-002.ckpt is missing"
    ):
        load_training_state(index, path, names, 0, 1)
