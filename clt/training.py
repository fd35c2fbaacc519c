"""Training: LightningModule (the CLT step), DataModule (streamed activations), callbacks (native
checkpoints, evaluation, throughput) and `run(cfg)`, which `train.py` calls."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset

from . import loss as losses
from .config import TrainConfig
from .data import ActivationSource, DataPosition
from .files import write_atomic
from .metrics import fvu_per_layer, l0_per_layer, spliced_eval
from .model import CLTArchitecture, CrossLayerTranscoder
from .parallel import Parallel


class CLTModule(L.LightningModule):
    """One optimisation step of the CLT on a batch of activations (x, y): [N, L, d]."""

    def __init__(self, cfg: TrainConfig, arch: CLTArchitecture):
        super().__init__()
        self.cfg = cfg
        self.clt = CrossLayerTranscoder(arch, cfg.clt.threshold_init)
        # tokens since each feature last fired (dead-feature tracking), part of the training state
        self.register_buffer("tokens_since_fired", torch.zeros(arch.n_layers, arch.d_sae, dtype=torch.long))
        self.fp = Parallel()  # collectives of the (data × feature-shard) mesh; none by default
        self.data_position: dict | None = None  # position after the last batch trained on
        self.restored_position: dict | None = None  # position read from a checkpoint

    # -- initialisation from data (DESIGN.md §1) -------------------------------------------------
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
            lam = c.sparsity_coeff * losses.ramp(self.global_step, self.cfg.trainer.max_steps,
                                                  c.sparsity_warmup_frac)
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
            logs |= {"metrics/fvu": sse.sum() / sst.sum().clamp_min(1e-12), "metrics/l0": l0.mean(),
                     "sparsity/dead_fraction": self.fp.sum(dead.float().mean()) / self.fp.world}
            logs |= {f"metrics/fvu/layer_{i}": v for i, v in enumerate(fvu)}
            logs |= {f"metrics/l0/layer_{i}": v for i, v in enumerate(l0)}
        return total, logs

    def configure_optimizers(self):
        o, steps = self.cfg.optim, self.cfg.trainer.max_steps
        opt = torch.optim.Adam(self.clt.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
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
        checkpoint["clt_data_position"] = self.data_position
        checkpoint["clt_rng"] = torch.get_rng_state()
        checkpoint["clt_config"] = self.cfg.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restored_position = checkpoint.get("clt_data_position")
        if "clt_rng" in checkpoint:
            torch.set_rng_state(checkpoint["clt_rng"])


class _Batches(IterableDataset):
    def __init__(self, source: ActivationSource, module: CLTModule):
        self.source, self.module = source, module

    def __iter__(self):
        restored = self.module.restored_position
        start = DataPosition.from_dict(restored) if restored else None
        return self.source.batches(start)


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, source: ActivationSource, module: CLTModule):
        super().__init__()
        self.source, self.module = source, module

    def train_dataloader(self):
        # batch_size=None: the source already yields whole batches; generation runs in-process
        return DataLoader(_Batches(self.source, self.module), batch_size=None, num_workers=0)


# ---------------------------------------------------------------------------------------------
# Callbacks


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimisation steps (the activation stream has no length), starting at the
    resumed step; shows tokens/s, FVU and L0."""

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
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
            pl_module.log("perf/tokens_per_s", self.batch_tokens / max(self.dt, 1e-9), prog_bar=True,
                          on_step=True)
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
    (config.json + model.safetensors, atomically) to `<run_dir>/clt`."""

    def __init__(self, run_dir: Path, every: int):
        self.ckpt, self.native, self.every = run_dir / "checkpoints" / "last.ckpt", run_dir / "clt", every
        self.saved_step = -1

    def save(self, trainer, module: CLTModule):
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.ckpt)
        summary = {"step": trainer.global_step, "tokens": trainer.global_step * module.cfg.trainer.batch_tokens}
        module.clt.save_pretrained(self.native, summary=summary)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.saved_step != trainer.global_step:
            self.save(trainer, pl_module)


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
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    subject = load_subject(cfg.model, "cuda" if use_cuda else "cpu")
    source = ActivationSource(subject, cfg.data, cfg.trainer.batch_tokens, cfg.seed)
    c = cfg.clt
    arch = CLTArchitecture(
        n_layers=subject.n_layers, d_model=subject.d_model, d_sae=c.d_sae, activation=c.activation, k=c.k,
        bandwidth=c.bandwidth, log_threshold=c.log_threshold, ste_to_input=c.ste_to_input, decode=c.decode,
        subject_model=cfg.model.name_or_path, input_hook=cfg.model.input_hook, output_hook=cfg.model.output_hook)
    module = CLTModule(cfg, arch)
    eval_windows = source.text.eval_windows()  # also checks the dataset and its text column early
    if not resuming:
        x, y = source.first_activations(cfg.data.norm_batches)
        module.initialize_from_data(x, y)
        del x, y
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, save_dir=str(run_dir),
                             tags=list(cfg.logger.tags), config=cfg.to_dict(), id=_wandb_id(run_dir),
                             resume="allow")
        loggers = [logger, _csv_logger(run_dir)]
    else:
        loggers = [_csv_logger(run_dir)]
    t = cfg.trainer
    evaluate = Evaluate(subject, eval_windows, t.eval_every)
    callbacks = [
        Checkpoints(run_dir, t.ckpt_every),
        evaluate,
        Throughput(t.batch_tokens),
        StepProgressBar(refresh_rate=1),
    ]
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
        max_steps=t.max_steps, logger=loggers, callbacks=callbacks, log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip or None, default_root_dir=str(run_dir),
        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=ActivationDataModule(source, module), ckpt_path=str(ckpt) if resuming else None)
    if not cfg.report:
        return {"run_dir": str(run_dir)}
    silent = module.tokens_since_fired >= min(c.dead_after_tokens, trainer.global_step * t.batch_tokens)
    return final_report(module.clt, source, subject, eval_windows, run_dir, silent.float().mean().item())


def _csv_logger(run_dir: Path):
    from lightning.pytorch.loggers import CSVLogger
    return CSVLogger(save_dir=str(run_dir), name="logs", version=0)


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id stored in the run directory, so a resumed run continues the same W&B run."""
    import uuid
    path = run_dir / "wandb_id"
    if not path.exists():
        write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()
