"""Training: LightningModule (the CLT step), DataModule (streamed activations), callbacks (native
checkpoints, evaluation, throughput) and `run(cfg)`, which `train.py` calls."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, IterableDataset

from . import loss as losses
from .config import TrainConfig
from .data import ActivationSource, DataPosition, TextPosition
from .files import write_atomic
from .metrics import fvu_per_layer, l0_per_layer, spliced_eval
from .model import CLTArchitecture, CrossLayerTranscoder
from .parallel import (
    Parallel,
    build_mesh,
    load_training_state,
    mesh_shape,
    remove_other_shardings,
    save_sharded,
    shard_checkpoint,
    shard_clt,
    shard_range,
)

# ---------------------------------------------------------------------------------------------
# Lightning strategies on the mesh of clt/parallel.py (kept here, with the rest of the Lightning
# wiring, so that `load_clt` can read sharded checkpoints through clt.parallel without importing
# Lightning)


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
        path, world = Path(filepath), self.feature_shards
        if self.replica == 0:
            own = {**checkpoint, "clt_shard": {"rank": self.shard, "world": world}}
            self.checkpoint_io.save_checkpoint(own, shard_checkpoint(path, self.shard, world))
        self.barrier("clt_shards_saved")  # the index is written last: it points at complete shards
        if self.global_rank == 0:
            keep = ("epoch", "global_step", "pytorch-lightning_version", "clt_config")
            index = {k: checkpoint[k] for k in keep if k in checkpoint}
            self.checkpoint_io.save_checkpoint({**index, "clt_feature_shards": world}, path)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        return _load_for(self, checkpoint_path, self.shard, self.feature_shards, weights_only)


def _load_for(strategy, path, shard: int, shards: int, weights_only=None) -> dict:
    ckpt = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    names = [f"clt.{n}" for n, _ in strategy.lightning_module.clt.named_parameters()]
    return load_training_state(ckpt, path, names, shard, shards)


class CLTSingleDevice(SingleDeviceStrategy):
    """One process; reads a training checkpoint written by any mesh (re-assembled on load)."""

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        return _load_for(self, checkpoint_path, 0, 1, weights_only)


class CLTModule(L.LightningModule):
    """One optimisation step of the CLT on a batch of activations (x, y): [N, L, d]."""

    def __init__(self, cfg: TrainConfig, arch: CLTArchitecture):
        super().__init__()
        self.cfg = cfg
        self.clt = CrossLayerTranscoder(arch, cfg.clt.threshold_init)
        # tokens since each feature last fired (dead-feature tracking), part of the training state
        self.register_buffer("tokens_since_fired", torch.zeros(arch.n_layers, arch.d_sae, dtype=torch.long))
        self.fp = Parallel()  # collectives of the (data × feature-shard) mesh; none by default
        self.replica = 0  # this process's data-parallel replica
        self.data_position: dict | None = None  # position after the last batch trained on
        self.restored_position: dict | None = None  # position read from a checkpoint
        self.silent_fraction: float | None = None  # features that never fired (set at the end of fit)

    def setup(self, stage: str) -> None:
        """Take this process's place on the mesh (CLTStrategy): keep its feature shard of the full
        CLT (initialised identically on every rank) and route selection and decode through the
        mesh's collectives. Runs before the optimizer is built and before a checkpoint is restored."""
        strategy = self.trainer.strategy
        fp = getattr(strategy, "parallel", None)
        if fp is None:
            return
        self.fp, self.replica = fp, strategy.replica
        if fp.shards:
            lo, hi = shard_range(self.clt.d_sae, strategy.shard, fp.world)
            self.clt = shard_clt(self.clt, strategy.shard, fp.world)
            self.tokens_since_fired = self.tokens_since_fired[:, lo:hi].clone()
        fp.apply(self.clt)

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
        x, y, position = batch  # x, y: [N, L, d]
        total, logs = self.loss(x, y)
        logs["details/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        bar = ("metrics/fvu", "metrics/l0")
        for k, v in logs.items():
            self.log(k, v, prog_bar=k in bar, on_step=True, on_epoch=False)
        self.data_position = position
        return total

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x, y: [N, L, d] -> (total loss, metrics). Also advances the dead-feature counters and
        the BatchTopK inference threshold."""
        c, clt = self.cfg.clt, self.clt
        h, a = clt.encode_activate(x)  # [N, L, F] each
        y_hat = clt.decode_normalized(a, support=clt.gradient_support(h, a))  # [N, L, d], normalised
        y_n = y.to(y_hat.dtype) * clt.output_scale[:, None]
        mse, sse, sst = losses.reconstruction(y_hat, y_n, sst=self.fp.batch_sst(y_n.detach()))
        total = mse
        logs = {"losses/mse": mse}
        if c.activation in ("jumprelu", "relu"):
            norms = clt.decoder_norms()
            lam = c.sparsity_coeff * losses.ramp(
                self.global_step, self.cfg.trainer.max_steps, c.sparsity_warmup_frac
            )
            sparsity = self.fp.sum(losses.tanh_sparsity(a, norms, c.sparsity_c))
            theta = clt.threshold if c.activation == "jumprelu" else 0.0
            preact = self.fp.sum(losses.preactivation(h, theta, norms))
            total = total + lam * sparsity + c.preact_coeff * preact
            logs |= {"losses/sparsity": sparsity, "losses/preact": preact, "details/lambda_s": lam}
        dead = self.tokens_since_fired >= c.dead_after_tokens  # [L, F]
        if c.activation in ("topk", "batchtopk"):
            aux = torch.zeros((), device=self.device)
            if self.fp.any(dead):
                a_aux = self.fp.auxk_activations(h, dead, c.auxk_k)
                e_hat = clt.decode_normalized(a_aux, bias=False)
                aux = losses.auxk(e_hat, (y_n - y_hat).detach(), sst)
                total = total + c.auxk_coeff * aux
            logs["losses/auxk"] = aux
        logs["losses/total"] = total
        if self.fp.data:  # logged losses: means over the global batch (the returned total stays local)
            logs = {k: self.fp.data_mean(v) if k.startswith("losses/") else v for k, v in logs.items()}

        with torch.no_grad():
            fired = self.fp.data_sum((a != 0).any(0).to(torch.int32)) > 0  # anywhere in the global batch
            self.tokens_since_fired.add_(x.shape[0] * self.fp.replicas).masked_fill_(fired, 0)
            if c.activation == "batchtopk":
                clt.update_batchtopk_threshold(c.batchtopk_threshold_decay)
            sse = self.fp.data_mean(sse)
            fvu, l0 = fvu_per_layer(sse, sst), self.fp.data_mean(self.fp.sum(l0_per_layer(a)))
            logs |= {
                "metrics/fvu": sse.sum() / sst.sum().clamp_min(1e-12),
                "metrics/l0": l0.mean(),
                "sparsity/dead_fraction": self.fp.sum(dead.float().mean()) / self.fp.world,
            }
            logs |= {f"metrics/fvu/layer_{i}": v for i, v in enumerate(fvu)}
            logs |= {f"metrics/l0/layer_{i}": v for i, v in enumerate(l0)}
        return total, logs

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.fp.shards and gradient_clip_val:  # the norm of the whole CLT, over the shards
            self.fp.clip_grad_norm_(self.clt.named_parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_end(self) -> None:
        with torch.no_grad():
            steps_tokens = self.trainer.global_step * self.cfg.trainer.batch_tokens
            silent = self.tokens_since_fired >= min(self.cfg.clt.dead_after_tokens, steps_tokens)
            self.silent_fraction = (self.fp.sum(silent.float().mean()) / self.fp.world).item()

    def configure_optimizers(self):
        o, steps = self.cfg.optim, self.cfg.trainer.max_steps
        opt = torch.optim.Adam(
            self.clt.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        decay_start = int(steps * (1 - o.decay_frac))

        def schedule(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if step >= decay_start and o.decay_frac > 0:
                return max(0.0, (steps - step) / max(1, steps - decay_start))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exact resume: data position and RNG travel with Lightning's checkpoint --------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        positions = [self.data_position]
        if self.fp.data:  # every replica's position: each streams its own share of the text
            positions = [None] * self.fp.replicas
            torch.distributed.all_gather_object(positions, self.data_position, group=self.fp.data_group)
        checkpoint["clt_data_positions"] = positions
        checkpoint["clt_rng"] = torch.get_rng_state()
        checkpoint["clt_config"] = self.cfg.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        positions = checkpoint.get("clt_data_positions", [checkpoint.get("clt_data_position")])
        self.restored_position = resume_position(positions, self.fp.replicas, self.replica)
        if "clt_rng" in checkpoint:
            torch.set_rng_state(checkpoint["clt_rng"])


def resume_position(positions: list[dict | None], replicas: int, replica: int) -> dict | None:
    """Where replica `replica` of `replicas` resumes, from the positions of the saved run's replicas.
    Same number of replicas: exactly where it stopped. Another number: the text shards change, so
    every new replica starts a fresh share of the documents after the last one any saved replica
    had reached (no document is trained on twice; at most one buffer per replica is skipped)."""
    if len(positions) == replicas:
        return positions[replica]
    if any(p is None for p in positions):
        return None
    if all("cache" in p for p in positions):  # cached data: every replica reads the same blocks
        return positions[0]
    from lightning.pytorch.utilities import rank_zero_warn

    saved = [DataPosition.from_dict(p) for p in positions]
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


class _Batches(IterableDataset):
    def __init__(self, source: ActivationSource, module: CLTModule):
        self.source, self.module = source, module

    def __iter__(self):
        return self.source.batches(self.module.restored_position)


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, source: ActivationSource, module: CLTModule):
        super().__init__()
        self.source, self.module = source, module

    def train_dataloader(self):
        # each data-parallel replica streams its own share of the text and the global batch is
        # split between them (the ranks of one replica's feature shards read the same batches)
        fp, replica = self.module.fp, self.module.replica
        if fp.data:
            self.source.shard_data(replica, fp.replicas, self.module.cfg.trainer.batch_tokens)
        # batch_size=None: the source already yields whole batches; generation runs in-process
        return DataLoader(_Batches(self.source, self.module), batch_size=None, num_workers=0)


# ---------------------------------------------------------------------------------------------
# Callbacks


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimisation steps (the activation stream has no length), starting at the
    resumed step; shows tokens/s, FVU and L0."""

    def on_train_start(self, trainer, *args):
        super().on_train_start(trainer, *args)
        self._steps(trainer)

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._steps(trainer)

    def _steps(self, trainer):
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {k.split("/")[-1]: v for k, v in metrics.items()}


class Throughput(L.Callback):
    """Logs `perf/tokens_per_s` (whole step, activation generation included) on the progress bar:
    batch tokens over a moving average of the step time (averaging times, not rates, so the steps
    that regenerate the buffer count in full)."""

    def __init__(self, batch_tokens: int, decay: float = 0.95):
        self.batch_tokens, self.decay, self.t0, self.dt = batch_tokens, decay, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.t0 is not None:
            dt = now - self.t0
            self.dt = dt if self.dt is None else self.decay * self.dt + (1 - self.decay) * dt
            pl_module.log(
                "perf/tokens_per_s", self.batch_tokens / max(self.dt, 1e-9), prog_bar=True, on_step=True
            )
        self.t0 = now


class Evaluate(L.Callback):
    """Every `every` steps and at the end: eval/* on the held-out windows."""

    def __init__(self, subject, windows: torch.Tensor, every: int):
        self.subject, self.windows, self.every = subject, windows, every
        self.last: dict[str, float] = {}

    def _run(self, trainer, module: CLTModule):
        if self.windows.numel() == 0:
            return
        self.last = spliced_eval(self.subject, module.clt, self.windows)
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        if self.every and trainer.global_step == 0:  # the starting point
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self._run(trainer, pl_module)


class Checkpoints(L.Callback):
    """Every `every` steps and at the end of training: Lightning's training state (weights,
    optimizer, schedule, step, data position, RNG; written atomically) to
    `<run_dir>/checkpoints/last.ckpt` for exact resume, and the CLT in the native format
    (config.json + model.safetensors, atomically) to `<run_dir>/clt`. Feature-sharded: one of each
    per shard (`last.shard-SSS-of-WWW.ckpt`, `clt/shard-SSS-of-WWW/`), written by the first replica."""

    def __init__(self, run_dir: Path, every: int):
        self.ckpt, self.native, self.every = run_dir / "checkpoints" / "last.ckpt", run_dir / "clt", every
        self.saved_step = -1

    def save(self, trainer, module: CLTModule):
        if trainer.is_global_zero:
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("clt_ckpt_dir")
        trainer.save_checkpoint(self.ckpt, weights_only=False)
        summary = {
            "step": trainer.global_step,
            "tokens": trainer.global_step * module.cfg.trainer.batch_tokens,
        }
        if module.fp.shards:
            if module.replica == 0:
                save_sharded(module.clt, self.native, summary=summary)
            trainer.strategy.barrier("clt_native_shards")
        elif trainer.is_global_zero:
            module.clt.save_pretrained(self.native, summary=summary)
        if trainer.is_global_zero:  # what an earlier mesh (or an unsharded run) wrote is superseded
            world = module.fp.world
            remove_other_shardings(
                self.ckpt.parent.glob(f"{self.ckpt.stem}.shard-*-of-*{self.ckpt.suffix}"), world
            )
            remove_other_shardings(self.native.glob("shard-*-of-*"), world)
            if module.fp.shards:
                for name in ("config.json", "model.safetensors"):
                    (self.native / name).unlink(missing_ok=True)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.saved_step != trainer.global_step:
            self.save(trainer, pl_module)


def slurm_job_id() -> str | None:
    """This Slurm job's id for scontrol (`<array job>_<task>` for an array task), None outside Slurm."""
    import os

    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Requeue(L.Callback):
    """Slurm preemption: on SIGUSR1 or SIGUSR2 (`sbatch --signal=USR1@90`, submitit's USR2) the
    handler only raises a flag; at the end of the current step the ranks agree, save the checkpoint,
    rank 0 runs `scontrol requeue <job>` and training stops. The requeued job finds the checkpoint in
    run_dir and resumes from it, exactly (same step, data position, RNG)."""

    SIGNALS = ("SIGUSR1", "SIGUSR2")

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints, self.flag, self.requeued, self.previous = checkpoints, False, False, {}

    def _handler(self, signum, frame):
        self.flag = True

    def install(self) -> None:
        """Catch the signals from now on (before the subject loads: a signal during set-up is acted
        on at the end of the first step)."""
        import signal

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (an embedding application): no preemption handling
                return

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.flag, all=False):
            return
        import subprocess

        self.checkpoints.save(trainer, pl_module)
        job = slurm_job_id()
        if trainer.is_global_zero:
            print(
                f"preemption signal: checkpoint at step {trainer.global_step}; requeueing Slurm job {job}",
                flush=True,
            )
            if job:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if done.returncode:
                    print(f"scontrol requeue {job} failed: {done.stderr.strip()}", flush=True)
        self.requeued, trainer.should_stop = True, True

    def on_train_end(self, trainer, pl_module):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ---------------------------------------------------------------------------------------------
# A whole run


def run(cfg: TrainConfig) -> dict:
    """Train a CLT as configured; resume when `run_dir` (or `resume`) holds a checkpoint.
    Returns the final report (per-layer FVU/L0, eval/*, paths)."""
    import json

    from .config import ConfigError, check_resume
    from .report import final_report
    from .subject import load_subject

    run_dir = Path(cfg.resume or cfg.run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume and not ckpt.exists():
        raise ConfigError(f"resume={cfg.resume!r}: no checkpoint at {ckpt}")
    resuming = ckpt.exists()
    if resuming:
        saved_path = run_dir / "config.json"
        if not saved_path.exists():
            raise ConfigError(f"cannot resume {run_dir}: its config.json is missing")
        check_resume(json.loads(saved_path.read_text()), cfg.to_dict())
        try:  # fail early and clearly on an unreadable checkpoint
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ConfigError(f"cannot resume {run_dir}: unreadable checkpoint {ckpt}: {e}") from e
        if "clt_config" not in state:
            raise ConfigError(f"cannot resume {run_dir}: {ckpt} is not a clt training checkpoint")
        del state

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    t, c = cfg.trainer, cfg.clt
    evaluate = Evaluate(None, torch.empty(0, dtype=torch.long), t.eval_every)
    checkpoints = Checkpoints(run_dir, t.ckpt_every)
    requeue = Requeue(checkpoints)
    import sys

    bar = StepProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50)  # Slurm logs: not every step
    callbacks = [checkpoints, evaluate, Throughput(t.batch_tokens), bar]
    if t.requeue:
        requeue.install()
        callbacks.append(requeue)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg),
        precision=t.precision,
        max_steps=t.max_steps,
        logger=_loggers(cfg, run_dir),
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip or None,
        default_root_dir=str(run_dir),
        plugins=_cluster_plugins(),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    strategy = trainer.strategy
    if isinstance(strategy, CLTStrategy):  # the mesh: validated before any process is launched
        strategy.feature_shards = (c.feature_shards or trainer.num_devices) if c.shard_features else 1
        mesh_shape(trainer.world_size, strategy.feature_shards, c.d_sae, t.batch_tokens)

    # every process: the subject on its own device, the data, the CLT initialised identically
    subject = load_subject(cfg.model, strategy.root_device)
    source = make_source(cfg, subject)
    arch = CLTArchitecture(
        n_layers=subject.n_layers,
        d_model=subject.d_model,
        d_sae=c.d_sae,
        activation=c.activation,
        k=c.k,
        bandwidth=c.bandwidth,
        log_threshold=c.log_threshold,
        ste_to_input=c.ste_to_input,
        decode=c.decode,
        subject_model=cfg.model.name_or_path,
        input_hook=cfg.model.input_hook,
        output_hook=cfg.model.output_hook,
    )
    module = CLTModule(cfg, arch)
    evaluate.subject, evaluate.windows = subject, source.eval_windows()  # checks the dataset early
    if not resuming:
        x, y = source.first_activations(cfg.data.norm_batches)  # the same documents on every rank
        module.initialize_from_data(x, y)
        del x, y
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    trainer.fit(
        module, datamodule=ActivationDataModule(source, module), ckpt_path=str(ckpt) if resuming else None
    )
    if requeue.requeued:
        return {"run_dir": str(run_dir), "requeued": True}
    if not trainer.is_global_zero:
        return {"run_dir": str(run_dir)}
    report = {"run_dir": str(run_dir)}
    if cfg.report:
        clt = module.clt
        if module.fp.shards:  # the report needs the whole CLT: reassemble it from the saved shards
            from .io import load_clt

            clt = load_clt(run_dir / "clt", device=strategy.root_device)
        report = final_report(clt, source, subject, evaluate.windows, run_dir, module.silent_fraction or 0.0)
    if cfg.hub.repo_id:  # the native CLT, its circuit-tracer export and a model card with the report
        from .io import push_to_hub

        report["hub"] = push_to_hub(
            run_dir, cfg.hub.repo_id, revision=cfg.hub.revision, private=cfg.hub.private
        )
        print(f"pushed to the Hub: {report['hub']}")
    return report


def make_source(cfg: TrainConfig, subject):
    """Where batches come from: the subject model online, or an activation cache (data.cache), whose
    text settings then replace the run's (so config.json records what was trained on)."""
    if not cfg.data.cache:
        return ActivationSource(subject, cfg.data, cfg.trainer.batch_tokens, cfg.seed)
    from .data.cache import CachedActivations

    source = CachedActivations(subject, cfg.data, cfg.trainer.batch_tokens, cfg.seed, cfg.model)
    for k, v in source.text_config().items():
        setattr(cfg.data, k, v)
    return source


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


def _loggers(cfg: TrainConfig, run_dir: Path) -> list:
    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            save_dir=str(run_dir),
            tags=list(cfg.logger.tags),
            config=cfg.to_dict(),
            id=_wandb_id(run_dir),
            resume="allow",
        )
        return [logger, _csv_logger(run_dir)]
    return [_csv_logger(run_dir)]


def _csv_logger(run_dir: Path):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run_dir), name="logs", version=0)


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id stored in the run directory, so a resumed run continues the same W&B run."""
    import uuid

    from lightning.pytorch.utilities import rank_zero_only

    path = run_dir / "wandb_id"
    if rank_zero_only.rank != 0:
        return path.read_text().strip() if path.exists() else ""  # only rank 0's logger talks to W&B
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()
