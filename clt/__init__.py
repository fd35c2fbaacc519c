"""clt: train cross-layer transcoders on Hugging Face causal LMs."""

from .config import CLTError, ConfigError, TrainConfig
from .model import CheckpointError, CLTArchitecture, CrossLayerTranscoder

__version__ = "0.1.0"
__all__ = [
    "CLTError",
    "CLTArchitecture",
    "CheckpointError",
    "ConfigError",
    "CrossLayerTranscoder",
    "TrainConfig",
]
