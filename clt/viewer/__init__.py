"""The attribution-graph viewer: `clt serve DIR` (a local server and a plain-JavaScript page) and
`clt view GRAPH --export graph.html` (one self-contained file)."""

from .graphs import GraphFolder, ViewerError
from .server import serve
from .state import load_state, validate_state

__all__ = ["GraphFolder", "ViewerError", "load_state", "serve", "validate_state"]
