"""Data: text streams, activation generation, shuffle buffer."""

from .stream import ActivationSource, DataPosition
from .text import PRESETS, DataError, TextPosition, WindowStream, load_text_dataset

__all__ = [
    "PRESETS",
    "ActivationSource",
    "DataError",
    "DataPosition",
    "TextPosition",
    "WindowStream",
    "load_text_dataset",
]
