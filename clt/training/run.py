"""A whole run: `run(cfg)` (what `train.py` calls) builds the subject, the activation source, the
CLT module, the strategy, callbacks and loggers, trains, and writes the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..config import TrainConfig
from ..data import ActivationSource
from ..errors import TrainingError
from ..files import write_atomic
from ..model import CLTArchitecture
from ..parallel import (
    mesh_shape,
)
from .callbacks import Checkpoints, Evaluate, Interrupt, Requeue, StepProgressBar, Throughput
from .module import CLTModule
from .strategy import CLTStrategy, _cluster_plugins, make_strategy


class _Batches(IterableDataset):
    def __init__(self, source: ActivationSource, module: CLTModule):
        self.source, self.module = source, module

    def __iter__(self):
        return self.source.batches(self.module.restored_position, tokens=True)  # (tokens: health.jsonl)


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, source: ActivationSource, module: CLTModule):
        super().__init__()
        self.source, self.module = source, module

    def train_dataloader(self):
        # each data-parallel replica streams its own share of the text and the global batch is
        # split between them (the ranks of one replica's feature shards read the same batches)
        mesh, replica = self.module.mesh, self.module.replica
        if mesh.data_parallel:
            self.source.split_for_replica(replica, mesh.n_replicas, self.module.cfg.trainer.batch_tokens)
        # batch_size=None: the source already yields whole batches; generation runs in-process
        return DataLoader(_Batches(self.source, self.module), batch_size=None, num_workers=0)


def float32_matmul_precision(cfg: TrainConfig, device: torch.device) -> str:
    """torch's fp32 matmul precision for this run: "high" (TF32 inputs, fp32 accumulation) for
    fp32 runs on a CUDA device with trainer.tf32, else "highest" (true fp32)."""
    fp32 = str(cfg.trainer.precision).startswith("32")
    return "high" if device.type == "cuda" and fp32 and cfg.trainer.tf32 else "highest"


def clt_architecture(cfg: TrainConfig, subject) -> CLTArchitecture:
    """The CLT a config asks for, on the subject model's layers and width."""
    c = cfg.clt
    return CLTArchitecture(
        n_layers=subject.n_layers,
        d_model=subject.d_model,
        d_sae=c.d_sae,
        activation=c.activation,
        k=c.k,
        topk_scope=c.topk_scope,
        bandwidth=c.bandwidth,
        log_threshold=c.log_threshold,
        ste_to_input=c.ste_to_input,
        subject_model=cfg.model.name_or_path,
        input_hook=cfg.model.input_hook,
        output_hook=cfg.model.output_hook,
    )


def run(cfg: TrainConfig) -> dict:
    """Train a CLT as configured; resume when `run_dir` (or `resume`) holds a checkpoint.
    Returns the final report (per-layer FVU/L0, eval/*, paths). The first process holds run_dir's
    lock throughout (`lock.RunLock`: a second trainer on the same run_dir stops with an error)."""
    from .lock import RunLock, first_process

    if not first_process():
        return _run(cfg)
    with RunLock(cfg.resume or cfg.run_dir):
        return _run(cfg)


def _run(cfg: TrainConfig) -> dict:
    import json

    from ..config import ConfigError, check_resume
    from ..report import final_report
    from ..subject import load_subject
    from .checkpoints import resume_checkpoint

    run_dir = Path(cfg.resume or cfg.run_dir)
    found = resume_checkpoint(run_dir)  # the newest intact one (a damaged newer one: a warning)
    if cfg.resume and found is None:
        raise ConfigError(f"resume={cfg.resume!r}: no checkpoint in {run_dir / 'checkpoints'}")
    resuming = found is not None
    ckpt = found if found is not None else run_dir / "checkpoints" / "last.ckpt"
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
    checkpoints = Checkpoints(run_dir, t.ckpt_every, t.keep_checkpoints)
    requeue = Requeue(checkpoints)
    interrupt = Interrupt(checkpoints)
    import sys

    bar = StepProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50)  # Slurm logs: not every step
    callbacks = [checkpoints, evaluate, Throughput(t.batch_tokens), bar]
    if t.requeue:
        requeue.install()
        callbacks.append(requeue)
    interrupt.install()
    callbacks.append(interrupt)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg),
        precision=cast(Any, t.precision),  # validated by Lightning
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

    torch.set_float32_matmul_precision(float32_matmul_precision(cfg, strategy.root_device))
    # every process: the subject on its own device, the data, the CLT initialised identically
    subject = load_subject(cfg.model, strategy.root_device)
    source = make_source(cfg, subject)
    arch = clt_architecture(cfg, subject)
    module = CLTModule(cfg, arch)
    module.run_dir = run_dir
    evaluate.subject, evaluate.windows = subject, source.eval_windows()  # checks the dataset early
    if not resuming:
        x, y = source.first_activations(cfg.data.norm_batches)  # the same documents on every rank
        module.initialize_from_data(x, y)
        del x, y
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(
            module, datamodule=ActivationDataModule(source, module), ckpt_path=str(ckpt) if resuming else None
        )
    except SIGTERMException:  # Lightning's own stop after SIGTERM, once `interrupt` has checkpointed
        interrupt.stopped = interrupt.stopped or "SIGTERM"
    finally:
        source.close()  # (the activation prefetch, if any)
        interrupt.restore()
    if requeue.requeued:
        return {"run_dir": str(run_dir), "requeued": True}
    if interrupt.stopped:
        return {"run_dir": str(run_dir), "stopped": interrupt.stopped, "step": trainer.global_step}
    if not trainer.is_global_zero:
        return {"run_dir": str(run_dir)}
    report = {"run_dir": str(run_dir)}
    if cfg.report:
        clt = module.clt
        if module.mesh.sharded:  # the report needs the whole CLT: reassemble it from the saved shards
            from ..io import load_clt

            clt = load_clt(run_dir / "clt", device=strategy.root_device)
        try:
            with subject.lock:  # (a prefetch thread may be finishing its last forward pass)
                report = final_report(
                    clt, source, subject, evaluate.windows, run_dir, module.silent_fraction or 0.0
                )
        except OSError as e:  # a full disk, an I/O error: the training itself is safe
            import errno
            import shutil

            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            free = shutil.disk_usage(run_dir).free / 2**20
            raise TrainingError(
                f"writing the report to {run_dir} failed: {'the disk is full' if full else e} "
                f"({free:,.0f} MiB free). Training finished and its checkpoint (step {trainer.global_step}) "
                "is intact: free space and run the same command again to write the report"
            ) from e
    if cfg.hub.repo_id:  # the native CLT, its circuit-tracer export and a model card with the report
        from ..push import push_to_hub

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
    from ..data.activation_cache import CachedActivations

    source = CachedActivations(subject, cfg.data, cfg.trainer.batch_tokens, cfg.seed, cfg.model)
    for k, v in source.text_config().items():
        setattr(cfg.data, k, v)
    return source


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
    if getattr(rank_zero_only, "rank", 0) != 0:
        return path.read_text().strip() if path.exists() else ""  # only rank 0's logger talks to W&B
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()
