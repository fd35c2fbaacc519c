"""clt: train cross-layer transcoders on Hugging Face causal LMs."""

from .config import ConfigError, TrainConfig
from .model import CheckpointError, CLTArchitecture, CrossLayerTranscoder

__version__ = "0.1.0"
__all__ = ["CLTArchitecture", "CheckpointError", "ConfigError", "CrossLayerTranscoder", "TrainConfig"]
