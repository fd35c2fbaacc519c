"""The Lightning strategies on the mesh of clt/parallel.py: DDP with feature shards, one device,
and the choice between them (kept apart from clt.parallel so that `load_clt` can read sharded
checkpoints without importing Lightning)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from ..config import TrainConfig
from ..parallel import (
    Parallel,
    build_mesh,
    load_training_state,
    shard_checkpoint,
)


class CLTStrategy(DDPStrategy):
    """Lightning's DDP, on the (replicas × feature shards) mesh: DDP averages gradients over the
    data group only (the ranks holding the same shard); the CLTModule gets the mesh's `Parallel`
    (`self.parallel`) in its `setup`. With shards, Lightning checkpoints are written per shard
    (`last.shard-SSS-of-WWW.ckpt`, by the first replica) plus a small index at the requested path,
    and load into any mesh (re-sharded on load)."""

    def __init__(self, feature_shards: int = 1, **kwargs):
        kwargs.setdefault("forward_sync_buffers", False)  # buffers are kept equal by the module itself
        super().__init__(**kwargs)
        self.feature_shards = feature_shards
        self.parallel, self.replica, self.shard = Parallel(), 0, 0

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.parallel, self.replica, self.shard = build_mesh(
            self.world_size, self.global_rank, self.feature_shards
        )
        self._ddp_kwargs["process_group"] = self.parallel.data_group

    # -- sharded Lightning checkpoints -------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if self.feature_shards == 1:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path, n_shards = Path(filepath), self.feature_shards
        if self.replica == 0:
            own = {**checkpoint, "clt_shard": {"rank": self.shard, "world": n_shards}}
            self.checkpoint_io.save_checkpoint(own, shard_checkpoint(path, self.shard, n_shards))
        self.barrier("clt_shards_saved")  # the index is written last: it points at complete shards
        if self.global_rank == 0:
            keep = ("epoch", "global_step", "pytorch-lightning_version", "clt_config")
            index = {k: checkpoint[k] for k in keep if k in checkpoint}
            self.checkpoint_io.save_checkpoint({**index, "clt_feature_shards": n_shards}, path)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        return _load_for(self, checkpoint_path, self.shard, self.feature_shards, weights_only)


def _load_for(strategy, path, shard: int, n_shards: int, weights_only=None) -> dict:
    ckpt = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    names = [f"clt.{n}" for n, _ in strategy.lightning_module.clt.named_parameters()]
    return load_training_state(ckpt, path, names, shard, n_shards)


class CLTSingleDevice(SingleDeviceStrategy):
    """One process; reads a training checkpoint written by any mesh (re-assembled on load)."""

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        return _load_for(self, checkpoint_path, 0, 1, weights_only)


def make_strategy(cfg: TrainConfig):
    """Our DDP strategy (the mesh) whenever more than one process may run or features are sharded;
    else one device (which still reads checkpoints written by any mesh)."""
    import os

    t = cfg.trainer
    d = t.devices
    many = (
        (isinstance(d, int) and (d > 1 or d == -1))
        or (isinstance(d, str) and d not in ("1", "auto"))
        or (isinstance(d, (list, tuple)) and len(d) > 1)
    )
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and _cluster_plugins()
    if t.strategy == "ddp" or cfg.clt.shard_features or t.num_nodes > 1 or many or slurm_tasks:
        return CLTStrategy(process_group_backend="nccl" if _wants_cuda(t) else "gloo")
    return CLTSingleDevice(device=torch.device("cuda", 0) if _wants_cuda(t) else torch.device("cpu"))


def _wants_cuda(t) -> bool:
    return torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")


def _cluster_plugins() -> list:
    """Under Slurm (`srun`): Lightning's SLURM environment (ranks, nodes, the main address), with
    requeueing left to our `Requeue` callback (checkpoint at a step boundary, then requeue)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
