"""Training, one concept per module: `module` (CLTModule: the step, optimizer, resume state),
`strategy` (the mesh's Lightning strategies), `callbacks` (progress, throughput, evaluation,
checkpoints, requeue) and `run` (`run(cfg)`, which `train.py` calls). The loss itself is
`clt.loss.clt_loss`, a plain function."""

from .callbacks import Checkpoints, Evaluate, Requeue, StepProgressBar, Throughput, slurm_job_id
from .module import CLTModule, resume_position
from .run import ActivationDataModule, clt_architecture, make_source, run
from .strategy import CLTSingleDevice, CLTStrategy, make_strategy

__all__ = [
    "ActivationDataModule",
    "CLTModule",
    "CLTSingleDevice",
    "CLTStrategy",
    "Checkpoints",
    "Evaluate",
    "Requeue",
    "StepProgressBar",
    "Throughput",
    "clt_architecture",
    "make_source",
    "make_strategy",
    "resume_position",
    "run",
    "slurm_job_id",
]
