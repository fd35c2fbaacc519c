"""CLTModule: one optimisation step of the CLT (the loss of clt/loss.py plus its bookkeeping:
dead-feature counters, the BatchTopK threshold, logged metrics), its optimizer and schedule, and
exact resume (data position and RNG in the checkpoint)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .. import loss as losses
from ..config import TrainConfig
from ..data import DataPosition, TextPosition
from ..errors import TrainingError
from ..metrics import fired, fvu_per_layer, l0_per_layer
from ..model import CLTArchitecture, CrossLayerTranscoder
from ..parallel import (
    Parallel,
    shard_clt,
    shard_range,
)
from .optim import Adam


class CLTModule(L.LightningModule):
    """One optimisation step of the CLT on a batch of activations (x, y): [N, L, d]."""

    tokens_since_fired: torch.Tensor  # [L, F] (a buffer: part of the training state)

    def __init__(self, cfg: TrainConfig, arch: CLTArchitecture):
        super().__init__()
        self.cfg = cfg
        self.clt = CrossLayerTranscoder(arch, cfg.clt.threshold_init, decode=cfg.clt.decode)
        # tokens since each feature last fired (dead-feature tracking), part of the training state
        self.register_buffer("tokens_since_fired", torch.zeros(arch.n_layers, arch.d_sae, dtype=torch.long))
        self.mesh = (
            Parallel()
        )  # collectives of the (data replicas × feature shards) mesh; one process by default
        self.replica = 0  # this process's data-parallel replica
        self.data_position: dict | None = None  # position after the last batch trained on
        self.restored_position: dict | None = None  # position read from a checkpoint
        self.silent_fraction: float | None = None  # features that never fired (set at the end of fit)
        # the non-finite guard (`optimizer_step`): skipped steps in all, in a row, and why this one
        self.skipped_steps, self.bad_in_a_row = 0, 0
        self._skip: dict | None = None
        self._grad_norm: torch.Tensor | None = None  # this step's, for the clip
        self.run_dir: Path | None = None  # where health.jsonl goes (set by `run`)
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, step), set by the Checkpoints callback

    def setup(self, stage: str) -> None:
        """Take this process's place on the mesh (CLTStrategy): keep its feature shard of the full
        CLT (initialised identically on every rank) and route selection and decode through the
        mesh's collectives. Runs before the optimizer is built and before a checkpoint is restored."""
        strategy: Any = self.trainer.strategy  # CLTStrategy on a mesh
        mesh = getattr(strategy, "parallel", None)
        if mesh is None:
            return
        self.mesh, self.replica = mesh, strategy.replica
        if mesh.sharded:
            lo, hi = shard_range(self.clt.d_sae, strategy.shard, mesh.n_shards)
            self.clt = shard_clt(self.clt, strategy.shard, mesh.n_shards)
            self.tokens_since_fired = self.tokens_since_fired[:, lo:hi].clone()
        self.clt.mesh = mesh  # the CLT calls the mesh's collectives for selection and decode

    # -- initialisation from data (docs/DESIGN.md §1) -------------------------------------------------
    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: [N, L, d] first activations -> normalisation scalars (E‖x̃‖ = √d), b_dec = E ỹ, and
        for JumpReLU an encoder bias making each feature fire on `init_firing_rate` of tokens."""
        clt, d = self.clt, x.shape[-1]
        x, y = x.float(), y.float()
        clt.input_scale.copy_(math.sqrt(d) / x.norm(dim=-1).mean(0).clamp_min(1e-8))
        clt.output_scale.copy_(math.sqrt(d) / y.norm(dim=-1).mean(0).clamp_min(1e-8))
        clt.b_dec.copy_((y * clt.output_scale[:, None]).mean(0))
        if clt.arch.activation == "jumprelu":
            rate = self.cfg.clt.init_firing_rate or min(10_000 / clt.d_sae, 0.1)
            pre = clt.encode(x) - clt.b_enc  # [N, L, F] without bias
            kth = max(1, min(pre.shape[0], round((1 - rate) * pre.shape[0])))
            q = pre.kthvalue(kth, dim=0).values  # [L, F]
            clt.b_enc.copy_(clt.threshold - q)

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y, position = batch[0], batch[1], batch[-1]  # x, y: [N, L, d] (batch[2]: token ids)
        tokens = batch[2] if len(batch) == 4 else None
        before, self.data_position = self.data_position, position  # (the batch is consumed either way)
        total, logs, advance = self._loss(x, y)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total.detach())), all=True):
            self._skip = {"reason": "non-finite loss", "loss": float(total), "position": before}
            self._skip["tokens"] = tokens.tolist() if tokens is not None else None
            return None  # no backward; `optimizer_step` skips the step
        logs["details/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        logs["health/skipped_steps"] = float(self.skipped_steps)
        bar = ("metrics/fvu", "metrics/l0")
        for k, v in logs.items():
            self.log(k, v, prog_bar=k in bar, on_step=True, on_epoch=False)
        self._skip = {"reason": None, "position": before, "tokens": tokens, "advance": advance}
        return total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The non-finite guard around Lightning's step: run training_step and backward (the
        closure), then skip the update when the loss or the gradient norm is not finite (on any
        rank): weights, optimizer state, dead-feature counters, BatchTopK threshold and the step
        count stay as they were, and the learning-rate schedule (a function of the step count) does
        not move; the batch is listed in run_dir/health.jsonl. `trainer.max_bad_steps` in a row stop
        the run with an error naming the last good checkpoint."""
        loss = optimizer_closure() if optimizer_closure is not None else None
        skip = self._skip or {"reason": "non-finite loss", "position": None, "tokens": None}
        if loss is not None:
            self._grad_norm = norm = self.mesh.grad_norm(self.clt.named_parameters())
            ok = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(norm)), all=True)
            if ok:
                self.bad_in_a_row = 0
                skip["advance"]()  # the dead-feature counters and the BatchTopK threshold
                optimizer.step()  # the precision plugin's step: the clip (configure_gradient_clipping), Adam
                return
            skip = skip | {"reason": "non-finite gradient norm", "grad_norm": float(norm)}
            if isinstance(skip.get("tokens"), torch.Tensor):
                skip["tokens"] = skip["tokens"].tolist()
        optimizer.zero_grad(set_to_none=True)
        self._skipped(skip)

    def _skipped(self, skip: dict) -> None:
        """Count and record a skipped step; stop after `trainer.max_bad_steps` in a row."""
        import json
        import sys

        step = self.trainer.global_step
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        # this optimizer step does not count: undo what Lightning's loop is about to record
        progress = self.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
        for p in (progress.total, progress.current):
            p.ready -= 1
            p.completed -= 1
        if self.trainer.is_global_zero:
            record = {"step": step + 1, **{k: v for k, v in skip.items() if k not in ("tokens", "advance")}}
            record["tokens"] = skip.get("tokens")
            where = ""
            if self.run_dir is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(self.run_dir / "health.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                where = f" (its tokens: {self.run_dir / 'health.jsonl'})"
            print(f"warning: step {step + 1}: {skip['reason']}; the batch is skipped{where}", file=sys.stderr)
        if self.bad_in_a_row >= self.cfg.trainer.max_bad_steps:
            last = self.last_checkpoint
            where = f"{last[0]} (step {last[1]})" if last else "none (no checkpoint was written yet)"
            raise TrainingError(
                f"{self.bad_in_a_row} steps in a row were skipped for a non-finite loss or gradient "
                f"(the last at step {step + 1}: {skip['reason']}); stopping. The last good checkpoint is "
                f"{where}. Lower optim.lr, check the data (health.jsonl lists the batches), or raise "
                "trainer.max_bad_steps"
            )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x, y: [N, L, d] -> (total loss, metrics). Also advances the dead-feature counters and
        the BatchTopK inference threshold."""
        total, logs, advance = self._loss(x, y)
        advance()
        return total, logs

    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        """(total loss, metrics, advance): `advance()` moves the dead-feature counters and the
        BatchTopK inference threshold on by this batch (training calls it for finite steps only)."""
        c, clt, mesh = self.cfg.clt, self.clt, self.mesh
        lam = c.sparsity_coeff * losses.ramp(
            self.global_step, self.cfg.trainer.max_steps, c.sparsity_warmup_frac
        )
        dead = self.tokens_since_fired >= c.dead_after_tokens  # [L, F]
        t = losses.clt_loss(clt, x, y, c, lam, dead, mesh)
        a, sse, sst = t.a, t.sse, t.sst
        logs: dict[str, Any] = {"losses/mse": t.mse}
        if t.sparsity is not None:
            logs |= {"losses/sparsity": t.sparsity, "losses/preact": t.preact, "details/lambda_s": lam}
        if t.auxk is not None:
            logs["losses/auxk"] = t.auxk
        logs["losses/total"] = t.total
        if mesh.data_parallel:  # logged losses: means over the global batch (the returned total stays local)
            logs = {k: mesh.data_mean(v) if k.startswith("losses/") else v for k, v in logs.items()}

        with torch.no_grad():
            on = self.mesh.data_sum(fired(a).to(torch.int32)) > 0  # anywhere in the global batch

            @torch.no_grad()
            def advance() -> None:
                self.tokens_since_fired.add_(x.shape[0] * self.mesh.n_replicas).masked_fill_(on, 0)
                if clt.inference_threshold:
                    clt.update_batchtopk_threshold(c.batchtopk_threshold_decay)

            sse = self.mesh.data_mean(sse)
            fvu, l0 = fvu_per_layer(sse, sst), self.mesh.data_mean(self.mesh.sum(l0_per_layer(a)))
            logs |= {
                "metrics/fvu": sse.sum() / sst.sum().clamp_min(1e-12),
                "metrics/l0": l0.mean(),
                "sparsity/dead_fraction": self.mesh.sum(dead.float().mean()) / self.mesh.n_shards,
            }
            logs |= {f"metrics/fvu/layer_{i}": v for i, v in enumerate(fvu)}
            logs |= {f"metrics/l0/layer_{i}": v for i, v in enumerate(l0)}
        return t.total, logs, advance

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        opt = getattr(optimizer, "optimizer", optimizer)  # (Lightning's wrapper, or the optimizer)
        if gradient_clip_val and self.folds_clipping(opt, gradient_clip_algorithm):
            # The clip folded into fused Adam: it divides every gradient by grad_scale in its own
            # pass, so clipping costs one read of the gradients (their norm, which the non-finite
            # guard has taken already) and no write.
            norm, self._grad_norm = self._grad_norm, None
            if norm is None:
                norm = self.mesh.grad_norm(self.clt.named_parameters())
            opt.grad_scale = ((norm + 1e-6) / gradient_clip_val).clamp(min=1.0).float()
        elif self.mesh.sharded and gradient_clip_val:  # the norm of the whole CLT, over the shards
            self.mesh.clip_grad_norm_(self.clt.named_parameters(), gradient_clip_val)
        elif gradient_clip_val and str(self.trainer.precision).startswith("bf16"):
            # bf16 has no loss scaler, so the gradients are already true: clip them here. (Lightning's
            # mixed-precision plugin refuses to clip for a fused optimizer, which unscales fp16
            # gradients itself.)
            torch.nn.utils.clip_grad_norm_(self.clt.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def folds_clipping(self, opt, algorithm=None) -> bool:
        """Whether clipping by norm folds into the optimizer: torch's fused Adam (its grad_scale) with
        no loss scaler of its own (fp32, bf16)."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        return (
            isinstance(opt, torch.optim.Adam)
            and bool(opt.defaults.get("fused"))
            and str(getattr(algorithm, "value", algorithm) or "norm") == "norm"
            and not precision.startswith("16")
        )

    def on_train_end(self) -> None:
        with torch.no_grad():
            steps_tokens = self.trainer.global_step * self.cfg.trainer.batch_tokens
            silent = self.tokens_since_fired >= min(self.cfg.clt.dead_after_tokens, steps_tokens)
            self.silent_fraction = (self.mesh.sum(silent.float().mean()) / self.mesh.n_shards).item()

    def configure_optimizers(self):
        o, steps = self.cfg.optim, self.cfg.trainer.max_steps
        params: Any = self.clt.parameters()  # one group (the layout of earlier checkpoints)
        if o.decoder_moments != "fp32":
            named = list(self.clt.named_parameters())
            params = [
                {"params": [p for n, p in named if not n.startswith("W_dec")]},
                {"params": [p for n, p in named if n.startswith("W_dec")], "moments": o.decoder_moments},
            ]
        opt = Adam(
            params,
            seed=self.cfg.seed,
            lr=o.lr,
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
            **({"fused": True} if o.fused else {"foreach": True}),
        )
        decay_start = int(steps * (1 - o.decay_frac))

        def schedule(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if step >= decay_start and o.decay_frac > 0:
                return max(0.0, (steps - step) / max(1, steps - decay_start))
            return 1.0

        # a function of the optimizer steps taken (Lightning steps the scheduler after every batch,
        # also after one the non-finite guard skipped, which must not move the schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: schedule(self.global_step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exact resume: data position and RNG travel with Lightning's checkpoint --------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        positions = [self.data_position]
        if self.mesh.data_parallel:  # every replica's position: each streams its own share of the text
            positions = [None] * self.mesh.n_replicas
            torch.distributed.all_gather_object(positions, self.data_position, group=self.mesh.data_group)
        checkpoint["clt_data_positions"] = positions
        checkpoint["clt_rng"] = torch.get_rng_state()
        checkpoint["clt_config"] = self.cfg.to_dict()
        checkpoint["clt_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        positions = checkpoint.get("clt_data_positions", [checkpoint.get("clt_data_position")])
        self.restored_position = resume_position(positions, self.mesh.n_replicas, self.replica)
        if "clt_rng" in checkpoint:
            torch.set_rng_state(checkpoint["clt_rng"])
        self.skipped_steps = checkpoint.get("clt_skipped_steps", 0)


def resume_position(positions: list[dict | None], replicas: int, replica: int) -> dict | None:
    """Where replica `replica` of `replicas` resumes, from the positions of the saved run's replicas.
    Same number of replicas: exactly where it stopped. Another number: the text shards change, so
    every new replica starts a fresh share of the documents after the last one any saved replica
    had reached (no document is trained on twice; at most one buffer per replica is skipped)."""
    if len(positions) == replicas:
        return positions[replica]
    known = [p for p in positions if p is not None]
    if len(known) < len(positions):
        return None
    if all("cache" in p for p in known):  # cached data: every replica reads the same blocks
        return known[0]
    from lightning.pytorch.utilities import rank_zero_warn

    saved = [DataPosition.from_dict(p) for p in known]
    text = [p.text or TextPosition() for p in saved]
    epoch = max(t.epoch for t in text)
    current = [t for t in text if t.epoch == epoch]
    offset = max(t.offset + len(positions) * t.docs for t in current)
    block = max(p.block for p in saved) + 1
    rank_zero_warn(
        f"resuming {len(positions)} data-parallel replicas as {replicas}: the text is re-split "
        f"after training document {offset} of pass {epoch} (exact resume needs the same "
        "number of replicas)"
    )
    return DataPosition(block, 0, TextPosition(0, [], epoch, offset)).to_dict()
