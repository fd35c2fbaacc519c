"""Callbacks: the step progress bar, throughput, periodic evaluation, native checkpoints and
requeue on a preemption signal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ..errors import TrainingError
from ..io import save_sharded
from ..metrics import spliced_eval
from ..parallel import remove_other_shardings
from .module import CLTModule


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
    """Logs, on the progress bar, `perf/tokens_per_s`: the whole pipeline (activation generation or
    the cache read included), batch tokens over a moving average of the time from one step's end
    to the next; and `perf/step_tokens_per_s`: the CLT step alone (forward, backward, optimizer:
    from the batch's arrival to the step's end). Averaging times, not rates, so the steps that
    regenerate the buffer count in full."""

    def __init__(self, batch_tokens: int, decay: float = 0.95):
        self.batch_tokens, self.decay = batch_tokens, decay
        self.t0: float | None = None  # the last step's end
        self.started: float | None = None  # this step's start
        self.dt: float | None = None
        self.step_dt: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.t0 is not None and self.started is not None:  # both from the second step on
            self.step_dt = self._average(self.step_dt, now - self.started)
            rate = self.batch_tokens / max(self.step_dt, 1e-9)
            pl_module.log("perf/step_tokens_per_s", rate, prog_bar=True, on_step=True)
            self.dt = self._average(self.dt, now - self.t0)
            rate = self.batch_tokens / max(self.dt, 1e-9)
            pl_module.log("perf/tokens_per_s", rate, prog_bar=True, on_step=True)
        self.t0 = now


class Evaluate(L.Callback):
    """Every `every` steps and at the end: eval/* on the held-out windows."""

    def __init__(self, subject, windows: torch.Tensor, every: int):
        self.subject, self.windows, self.every = subject, windows, every
        self.last: dict[str, float] = {}
        self.step = -1  # the step last evaluated

    def _run(self, trainer, module: CLTModule):
        if self.windows.numel() == 0:
            return
        self.step = trainer.global_step
        with self.subject.lock:  # (the activation prefetch shares the subject)
            self.last = spliced_eval(self.subject, module.clt, self.windows)
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        if self.every and trainer.global_step == 0:  # the starting point
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step != self.step:
            self._run(trainer, pl_module)


class Checkpoints(L.Callback):
    """Every `every` steps and at the end of training: Lightning's training state (weights,
    optimizer, schedule, step, data position, RNG) for exact resume, checksummed and rotated
    (`checkpoints.py`: `checkpoints/step-S.ckpt` + its manifest, `last.ckpt` linked to the newest,
    the newest `keep` kept), and the CLT in the native format (config.json + model.safetensors +
    checksums, atomically) to `<run_dir>/clt`, the save before it kept as `clt.previous`.
    Feature-sharded: one of each per shard (`step-S.shard-SSS-of-WWW.ckpt`, `clt/shard-SSS-of-WWW/`),
    written by the first replica."""

    def __init__(self, run_dir: Path, every: int, keep: int = 2):
        self.dir, self.native, self.every, self.keep = run_dir / "checkpoints", run_dir / "clt", every, keep
        self.ckpt = self.dir / "last.ckpt"
        self.saved_step = -1

    def save(self, trainer, module: CLTModule):
        from . import checkpoints as ck

        bad = [n for n, p in module.clt.named_parameters() if not bool(torch.isfinite(p).all())]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):  # never checkpoint NaN/Inf
            last = module.last_checkpoint
            where = f"{last[0]} (step {last[1]})" if last else "none (no checkpoint was written yet)"
            raise TrainingError(
                f"step {trainer.global_step}: non-finite weights ({', '.join(bad) or 'on another rank'}); "
                f"not checkpointed. The last good checkpoint is {where}"
            )
        step = trainer.global_step
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("clt_ckpt_dir")
        try:
            trainer.save_checkpoint(self.dir / f"{ck.stem(step)}.ckpt", weights_only=False)
            trainer.strategy.barrier("clt_ckpt_written")
            if trainer.is_global_zero:  # every file complete: the manifest makes the checkpoint exist
                ck.write_manifest(self.dir, step)
                ck.publish_last(self.dir, step)
                ck.rotate(self.dir, self.keep, step)
        except OSError as e:
            raise self._write_failed(e, step, module) from e
        module.last_checkpoint = (self.dir / f"{ck.stem(step)}.ckpt", step)
        try:
            self._save_native(trainer, module, step)
        except OSError as e:
            raise self._write_failed(e, step, module, native=True) from e
        self.saved_step = step

    def _write_failed(self, e: OSError, step: int, module: CLTModule, native: bool = False) -> TrainingError:
        """The error for a checkpoint that could not be written: the partial files removed, what
        failed, the space needed and free, and the checkpoint a resume starts from."""
        import errno
        import shutil

        from . import checkpoints as ck

        if not native:
            for p in ck.files_of(self.dir, ck.stem(step)) + [self.dir / f"{ck.stem(step)}.sha256"]:
                p.unlink(missing_ok=True)  # (no manifest: it never counted; the space back)
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{e.strerror or e}"
        where = self.native if native else self.dir
        sizes = [p.stat().st_size for s in ck.steps(self.dir)[:1] for p in ck.files_of(self.dir, ck.stem(s))]
        free = shutil.disk_usage(where.parent if not where.exists() else where).free
        need = (
            f"a checkpoint takes about {sum(sizes) / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free; "
            if sizes
            else ""
        )
        last = module.last_checkpoint
        resume = f"step {last[1]} ({last[0]})" if last else "the start (no checkpoint was written yet)"
        return TrainingError(
            f"step {step}: writing the {'native CLT' if native else 'checkpoint'} to {where} failed: {what}. "
            f"{need}the last checkpoint is intact: free space (or fix the error) and run the same "
            f"command again to resume from {resume}"
        )

    def _save_native(self, trainer, module: CLTModule, step: int) -> None:
        import shutil

        summary = {"step": step, "tokens": step * module.cfg.trainer.batch_tokens}
        previous = self.native.with_name(self.native.name + ".previous")
        if trainer.is_global_zero and self.native.exists():  # the save before this one stays
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.native, previous)
        trainer.strategy.barrier("clt_native_rotated")
        if module.mesh.sharded:
            if module.replica == 0:
                save_sharded(module.clt, self.native, summary=summary)
            trainer.strategy.barrier("clt_native_shards")
        elif trainer.is_global_zero:
            module.clt.save_pretrained(self.native, summary=summary)
        if trainer.is_global_zero and module.mesh.sharded:
            remove_other_shardings(self.native.glob("shard-*-of-*"), module.mesh.n_shards)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # (after a skipped batch the step count has not moved: no second checkpoint of the same step)
        if trainer.global_step % self.every == 0 and trainer.global_step != self.saved_step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.saved_step != trainer.global_step:
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        """The data stream gave up between two steps (`text.resilient`'s DataError): the last
        finished step is checkpointed, so the same command resumes exactly. (One process only: in
        a multi-process run the other ranks are not at this point to take part.)"""
        from ..errors import DataError

        if (
            isinstance(exception, DataError)
            and trainer.world_size == 1
            and self.saved_step != trainer.global_step
        ):
            self.save(trainer, pl_module)


def slurm_job_id() -> str | None:
    """This Slurm job's id for scontrol (`<array job>_<task>` for an array task), None outside Slurm."""
    import os

    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def install_handlers(names, handler) -> dict:
    """`handler` for the signals named, from now on -> {signal: the handler it replaced} (empty
    outside the main thread, e.g. in an embedding application: no signal handling there)."""
    import signal

    previous = {}
    for name in names:
        sig = getattr(signal, name)
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:
            return previous
    return previous


def restore_handlers(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


class Requeue(L.Callback):
    """Slurm preemption: on SIGUSR1 or SIGUSR2 (`sbatch --signal=USR1@90`, submitit's USR2) the
    handler only raises a flag; at the end of the current step the ranks agree, save the checkpoint,
    rank 0 runs `scontrol requeue <job>` and training stops. The requeued job finds the checkpoint in
    run_dir and resumes from it, exactly (same step, data position, RNG)."""

    SIGNALS = ("SIGUSR1", "SIGUSR2")

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints, self.flag, self.requeued = checkpoints, False, False
        self.previous: dict = {}

    def _handler(self, signum, frame):
        self.flag = True

    def install(self) -> None:
        """Catch the signals from now on (before the subject loads: a signal during set-up is acted
        on at the end of the first step)."""
        self.previous = install_handlers(self.SIGNALS, self._handler)

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
        restore_handlers(self.previous)
        self.previous = {}


class Interrupt(L.Callback):
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, `scancel`, the end of a Slurm time limit): the handler
    only raises a flag; at the end of the current step the ranks agree, save the checkpoint, and
    training stops cleanly (`stopped`: the signal's name; the run exits with 128 + its number). A
    second SIGINT exits at once (the last checkpoint stands; checkpoints are written atomically)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.flag: str | None = None
        self.stopped: str | None = None
        self.previous: dict = {}

    def _handler(self, signum, frame):
        import os
        import signal
        import sys

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.flag == "SIGINT":
            print("\nsecond SIGINT: exiting now (the last checkpoint stands)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if self.flag is None:
            again = " (Ctrl-C again to exit now)" if name == "SIGINT" else ""
            print(
                f"\n{name}: stopping after this step, with a checkpoint{again}", file=sys.stderr, flush=True
            )
            self.flag = name

    def install(self) -> None:
        self.previous = install_handlers(self.SIGNALS, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.flag is not None, all=False):
            return
        if self.checkpoints.saved_step != trainer.global_step:
            self.checkpoints.save(trainer, pl_module)
        self.stopped = self.flag or "a signal on another rank"
        if trainer.is_global_zero:
            print(
                f"{self.stopped}: checkpoint at step {trainer.global_step} in {self.checkpoints.ckpt}; "
                "the same command resumes",
                flush=True,
            )
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        self.restore()

    def restore(self) -> None:
        restore_handlers(self.previous)
        self.previous = {}
