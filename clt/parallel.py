"""Feature-sharded model parallelism for the CLT: the one place that knows about sharding.

Each rank of a shard group holds a contiguous slice of every layer's features: encoder rows,
encoder biases, decoder rows and thresholds (`shard_clt`); the decoder bias and the normalisation
scalars are replicated. The CLT receives the mesh's collectives (`clt.mesh = Parallel(…)`, None
by default) and calls them where the math needs the whole CLT:

    activate   TopK / BatchTopK select globally (`Parallel.topk`, `Parallel.batchtopk`): local
               candidates, all-gather, global threshold; JumpReLU / ReLU are local
    decode     each rank decodes its own features; the partial outputs are summed over the group
               (`Parallel.sum`; backward: identity, since every rank computes the same loss from the
               full output)

Loss terms that sum over features (sparsity, pre-activation loss, L0) go through `Parallel.sum`,
AuxK's selection through `Parallel.auxk_activations`. Data parallelism: gradients are averaged
over replicas (DDP); what depends on the whole batch is made global here: the FVU normaliser
(`batch_sst`), BatchTopK's selection (over data replicas and shards), dead-feature statistics and
logged metrics. `Parallel()` is the plain single process.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import loss as losses
from .errors import ShardingError  # noqa: F401 (re-exported)
from .model import CrossLayerTranscoder


class _SumShards(torch.autograd.Function):
    """Forward: all-reduce sum over the shard group. Backward: identity (the loss downstream is
    computed identically on every rank, so each rank's gradient is already the full one)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard_range(n_features: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Features [lo, hi) of feature shard `shard` of `n_shards`: contiguous, equal slices."""
    return shard * n_features // n_shards, (shard + 1) * n_features // n_shards


def shard_clt(clt: CrossLayerTranscoder, shard: int, n_shards: int) -> CrossLayerTranscoder:
    """Feature shard `shard` of `n_shards` (features [shard·F/S, (shard+1)·F/S) of every layer) of
    a full CLT. Its architecture records {"rank": shard, "world": n_shards, "d_sae": F} under
    extra["shard"] (the saved key names)."""
    F = clt.d_sae
    if F % n_shards:
        raise ShardingError(f"clt.d_sae={F} is not divisible by the {n_shards} feature shards")
    lo, hi = shard_range(F, shard, n_shards)
    arch = type(clt.arch)(
        **{
            **clt.arch.__dict__,
            "d_sae": hi - lo,
            "extra": {**clt.arch.extra, "shard": {"rank": shard, "world": n_shards, "d_sae": F}},
        }
    )
    local = CrossLayerTranscoder(arch, decode=clt.decode_path).to(clt.W_enc.device)
    state = {}
    for k, v in clt.state_dict().items():
        dim = shard_dim(k)
        state[k] = (v if dim is None else v.narrow(dim, lo, hi - lo)).clone()
    local.load_state_dict(state)
    return local


def unshard_clt(shards: list[CrossLayerTranscoder]) -> CrossLayerTranscoder:
    """The full CLT from its feature shards, in order."""
    info: list[Any] = [s.arch.extra.get("shard") for s in shards]
    if (
        any(i is None for i in info)
        or [i["rank"] for i in info] != list(range(len(shards)))
        or any(i["world"] != len(shards) for i in info)
    ):
        raise ShardingError(f"expected the {len(shards)} feature shards of one CLT in rank order, got {info}")
    extra = {k: v for k, v in shards[0].arch.extra.items() if k != "shard"}
    arch = type(shards[0].arch)(**{**shards[0].arch.__dict__, "d_sae": info[0]["d_sae"], "extra": extra})
    full = CrossLayerTranscoder(arch)
    states = [s.state_dict() for s in shards]
    state = {}
    for k, v in states[0].items():
        dim = shard_dim(k)
        state[k] = v if dim is None else torch.cat([s[k] for s in states], dim=dim)
    full.load_state_dict(state)
    return full


def shard_dim(name: str) -> int | None:
    """The feature dimension of a CLT tensor (name relative to the CLT), None if replicated."""
    if name in ("W_enc", "b_enc", "threshold_param"):  # [L, F, ...]
        return 1
    if name.startswith("W_dec."):  # [F, L − s, d]
        return 0
    return None


class Parallel:
    """Collectives of a training process on a (data replicas × feature shards) mesh.

    shard_group: the processes holding the other feature shards of the same replica.
    data_group: the processes holding the same feature shard in the other data-parallel replicas.
    select_group: the processes BatchTopK selects over (its batch spans the replicas and its
    features the shards): every process of the mesh (None: the default group).
    sharded / data_parallel: whether the features are split (over shard_group) and the batch is
    (over data_group); n_shards / n_replicas: how many ways. `Parallel()` is the single process."""

    def __init__(
        self,
        shard_group=None,
        data_group=None,
        select_group=None,
        sharded: bool = False,
        data_parallel: bool = False,
    ):
        self.shard_group, self.data_group, self.select_group = shard_group, data_group, select_group
        self.sharded, self.data_parallel = sharded, data_parallel
        self.n_shards = dist.get_world_size(shard_group) if sharded else 1
        self.n_replicas = dist.get_world_size(data_group) if data_parallel else 1

    # -- reductions over the feature shards ------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over shards of a per-shard partial (differentiable; gradient passes through)."""
        return _SumShards.apply(t, self.shard_group) if self.sharded else t

    def any(self, t: torch.Tensor) -> bool:
        """Whether any shard has a True (every rank takes the same branch)."""
        if not self.sharded:
            return bool(t.any())
        flag = t.any().to(torch.int32).reshape(1)
        dist.all_reduce(flag, group=self.shard_group)
        return bool(flag.item())

    def _gather_cat(self, t: torch.Tensor, group) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def kth_largest(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """v: [..., m] local values -> the k-th largest over all shards' values: [...]."""
        cand = v.topk(min(k, v.shape[-1]), dim=-1).values
        allc = self._gather_cat(cand, self.shard_group) if self.sharded else cand
        return allc.topk(min(k, allc.shape[-1]), dim=-1).values[..., -1]

    # -- reductions over the data replicas (statistics of the global batch; no gradient) ---------
    @torch.no_grad()
    def data_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.data_parallel:
            t = t.clone()
            dist.all_reduce(t, group=self.data_group)
        return t

    @torch.no_grad()
    def batch_sst(self, y: torch.Tensor) -> torch.Tensor:
        """y: [N, L, d] local -> [L]: E‖y − E y‖² over the global batch (two passes: exact)."""
        if not self.data_parallel:
            from .loss import batch_sst

            return batch_sst(y)
        n = self.data_sum(torch.tensor(float(y.shape[0]), device=y.device))
        mean = self.data_sum(y.sum(0)) / n
        return self.data_sum((y - mean).pow(2).sum(-1).sum(0)) / n

    def data_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over replicas of a per-replica mean (equal local batches)."""
        return self.data_sum(t.detach()) / self.n_replicas if self.data_parallel else t

    # -- global selection over the shards (and, for BatchTopK, the data replicas) ----------------
    def topk(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """TopK over the features of all shards: h: [N, L, F_local] -> a (ReLU'd)."""
        t = self.kth_largest(h.detach(), k)  # [N, L]
        return (h * (h >= t[..., None]).to(h.dtype)).relu()

    def batchtopk(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK over the global batch and all shards: h: [N, L, F_local] -> (a, the smallest
        positive value kept per layer: [L])."""
        n, n_layers, f = h.shape
        flat = h.detach().transpose(0, 1).reshape(n_layers, n * f)
        k = k * n * self.n_replicas  # k per token of the global batch
        top = flat.topk(min(k, flat.shape[-1]), dim=-1).values
        with torch.no_grad():
            kept = self._gather_cat(top, self.select_group).topk(k, dim=-1).values  # global k·N largest
        t = kept[:, -1]
        pos = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min(-1).values
        min_kept = torch.where(torch.isinf(pos), torch.zeros_like(pos), pos)
        return (h * (h >= t[None, :, None]).to(h.dtype)).relu(), min_kept

    def topk_all(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-layer TopK over all shards' features of all layers: h: [N, L, F_local] -> (a
        (ReLU'd), the per-layer inference thresholds this batch suggests: [L], `sparsity.topk_all`)."""
        n, layers, f = h.shape
        t = self.kth_largest(h.detach().reshape(n, layers * f), k * layers)  # [N]
        a = (h * (h >= t[:, None, None]).to(h.dtype)).relu()
        kept = self.sum((a.detach() > 0).sum((0, 2)).float())  # [L], over the shards
        flat = h.detach().transpose(0, 1).reshape(layers, n * f).float()
        out = torch.full((layers,), float("nan"), device=h.device)
        for layer, m in enumerate(kept.long().tolist()):
            if m > 0:  # the midpoint of the m-th and (m+1)-th largest (`sparsity._layer_thresholds`)
                hi, lo = self.kth_largest(flat[layer], m), self.kth_largest(flat[layer], m + 1)
                out[layer] = (hi + lo) / 2 if m < flat.shape[1] * self.n_shards else hi / 2
        return a, self.data_mean(out.clamp_min(0))

    def batchtopk_all(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-layer BatchTopK over the global batch, all shards and all layers: h: [N, L,
        F_local] -> (a, the smallest positive value kept per layer: [L], NaN where none)."""
        flat = h.detach().reshape(-1)
        k = k * h.shape[1] * h.shape[0] * self.n_replicas
        top = flat.topk(min(k, flat.numel())).values
        with torch.no_grad():
            kept = self._gather_cat(top, self.select_group).topk(k).values
            t = kept[-1]
            keep = (h.detach() >= t) & (h.detach() > 0)
            low = torch.where(keep, h.detach(), torch.full_like(h.detach(), float("inf"))).amin((0, 2))
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.select_group)
            low = torch.where(torch.isinf(low), torch.full_like(low, float("nan")), low)
        return (h * (h >= t).to(h.dtype)).relu(), low

    def auxk_activations(self, h: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        if not self.sharded:
            return losses.auxk_activations(h, dead, k_aux)
        k = min(k_aux, int(self.sum(dead.sum(-1)).max()))
        masked = h.masked_fill(~dead, torch.finfo(h.dtype).min)
        t = self.kth_largest(masked.detach(), k)
        return (masked * (masked >= t[..., None]).to(h.dtype)).relu() * dead

    @torch.no_grad()
    def grad_norm(self, named_params) -> torch.Tensor:
        """The gradient norm of the whole (unsharded) CLT: squared norms of the sharded parameters
        summed over the shards, replicated ones counted once (one process: the plain norm)."""
        params = [(n, p) for n, p in named_params if p.grad is not None]
        if not params:
            return torch.zeros(())
        dev = params[0][1].grad.device
        grads: dict[bool, list[torch.Tensor]] = {True: [], False: []}  # by: sharded?
        for n, p in params:
            grads[shard_dim(n) is not None].append(p.grad)
        sq = {
            k: torch.stack(torch._foreach_norm(g)).float().pow(2).sum() if g else torch.zeros((), device=dev)
            for k, g in grads.items()
        }
        return (self.sum(sq[True]) + sq[False]).sqrt()

    def clip_grad_norm_(self, named_params, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole (unsharded) CLT (`grad_norm`)."""
        params = [(n, p) for n, p in named_params if p.grad is not None]
        total = self.grad_norm(params)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total


__all__ = ["Parallel", "ShardingError", "shard_clt", "unshard_clt"]


# ---------------------------------------------------------------------------------------------
# The mesh, and the sharded Lightning training state (the strategies using them: clt/training.py)


def mesh_shape(world_size: int, n_shards: int, d_sae: int, batch_tokens: int) -> tuple[int, int]:
    """(n_replicas, n_shards) of a mesh of `world_size` processes; clear errors when they do not fit."""
    if world_size % n_shards:
        raise ShardingError(
            f"{n_shards} feature shards do not divide the {world_size} processes "
            "(trainer.devices × trainer.num_nodes); set clt.feature_shards to a divisor"
        )
    if d_sae % n_shards:
        raise ShardingError(
            f"clt.d_sae={d_sae} is not divisible by the {n_shards} feature shards "
            f"(world size {world_size}); choose d_sae or clt.feature_shards so that it is"
        )
    n_replicas = world_size // n_shards
    if batch_tokens % n_replicas:
        raise ShardingError(
            f"trainer.batch_tokens={batch_tokens} (the global batch) is not divisible by "
            f"the {n_replicas} data-parallel replicas"
        )
    return n_replicas, n_shards


def build_mesh(world_size: int, rank: int, n_shards: int) -> tuple[Parallel, int, int]:
    """Process groups of the (n_replicas × n_shards) mesh, rank = replica · n_shards + shard (the
    shards of a replica are neighbours: on one node with NVLink). Every process creates every group,
    in the same order. Returns (Parallel, replica, shard)."""
    n_replicas = world_size // n_shards
    shard_groups = [dist.new_group(list(range(r * n_shards, (r + 1) * n_shards))) for r in range(n_replicas)]
    data_groups = [dist.new_group(list(range(s, world_size, n_shards))) for s in range(n_shards)]
    replica, shard = divmod(rank, n_shards)
    mesh = Parallel(
        shard_group=shard_groups[replica],
        data_group=data_groups[shard],
        select_group=None,
        sharded=n_shards > 1,
        data_parallel=n_replicas > 1,
    )
    return mesh, replica, shard


def remove_other_shardings(paths, n_shards: int) -> None:
    """Delete the shard files or directories (named `…-of-NNN…`) not written by `n_shards` shards:
    those of an earlier mesh, superseded by a newer save (n_shards=1: every shard)."""
    for p in paths:
        count = re.search(r"-of-(\d+)", p.name)
        if count is None or int(count.group(1)) == n_shards:  # not a shard: left alone
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def shard_checkpoint(path, shard: int, n_shards: int):
    """The Lightning checkpoint file of feature shard `shard` of `n_shards`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shard-{shard:03d}-of-{n_shards:03d}{path.suffix}")


def _training_dim(key: str) -> int | None:
    """Feature dimension of a LightningModule state_dict entry."""
    if key == "tokens_since_fired":  # [L, F]
        return 1
    return shard_dim(key[4:]) if key.startswith("clt.") else None


def load_training_state(ckpt: dict, path, param_names: list[str], shard: int, n_shards: int) -> dict:
    """A Lightning checkpoint (or the index of a sharded one) -> the training state of feature
    shard `shard` of `n_shards`: module state, optimizer moments and dead-feature counters
    re-sharded when the checkpoint was written by another mesh. `param_names`: the optimizer's
    parameters in order."""
    saved = int(ckpt.get("clt_feature_shards", 1))
    if saved == n_shards:
        return ckpt if n_shards == 1 else _read_shard(path, shard, n_shards, ckpt)
    full = (
        ckpt
        if saved == 1
        else _concat_states([_read_shard(path, r, saved, ckpt) for r in range(saved)], param_names)
    )
    return _slice_state(full, param_names, shard, n_shards)


def _read_shard(path, shard: int, n_shards: int, index: dict) -> dict:
    """Feature shard `shard`'s checkpoint file; its "clt_shard" entry is {"rank": shard, "world":
    n_shards} (the saved key names)."""
    f = shard_checkpoint(path, shard, n_shards)
    if not f.exists():
        raise ShardingError(f"{path} was written by {n_shards} feature shards but {f.name} is missing")
    part = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
    if part.get("global_step") != index.get("global_step") or part.get("clt_shard") != {
        "rank": shard,
        "world": n_shards,
    }:
        raise ShardingError(
            f"{f} is not shard {shard} of {n_shards} at step {index.get('global_step')} "
            f"(found {part.get('clt_shard')} at step {part.get('global_step')}): "
            "the checkpoint's shards come from different saves or meshes"
        )
    return part


def _map_training_tensors(ckpt: dict, param_names: list[str], fn) -> dict:
    """A copy of `ckpt` whose sharded tensors (module state and Adam moments) are fn(key, dim, value)."""
    out = dict(ckpt)
    out["state_dict"] = {
        k: (v if _training_dim(k) is None else fn(("state", k), _training_dim(k), v))
        for k, v in ckpt["state_dict"].items()
    }
    opts = []
    for j, o in enumerate(ckpt.get("optimizer_states", [])):
        state = {}
        for i, st in o["state"].items():
            dim = _training_dim(param_names[i])
            state[i] = {
                k: (
                    fn(("opt", j, i, k), dim, v)
                    if dim is not None and torch.is_tensor(v) and v.dim() > 0
                    else v
                )
                for k, v in st.items()
            }
        opts.append({**o, "state": state})
    out["optimizer_states"] = opts
    out.pop("clt_shard", None)
    out.pop("clt_feature_shards", None)
    return out


def _concat_states(parts: list[dict], param_names: list[str]) -> dict:
    def get(key, p):
        if key[0] == "state":
            return p["state_dict"][key[1]]
        _, j, i, k = key
        return p["optimizer_states"][j]["state"][i][k]

    return _map_training_tensors(
        parts[0], param_names, lambda key, dim, v: torch.cat([get(key, p) for p in parts], dim=dim)
    )


def _slice_state(full: dict, param_names: list[str], shard: int, n_shards: int) -> dict:
    def cut(key, dim, v):
        n = v.shape[dim]
        if n % n_shards:
            raise ShardingError(
                f"the checkpoint's {n} features per layer are not divisible by {n_shards} shards"
            )
        lo, hi = shard_range(n, shard, n_shards)
        return v.narrow(dim, lo, hi - lo).clone()

    return _map_training_tensors(full, param_names, cut)
