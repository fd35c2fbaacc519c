"""The attribution-graph viewer: `clt serve DIR` (a local server and a plain-JavaScript page) and
`clt view GRAPH --export graph.html` (one self-contained file)."""

from .graphs import GraphFolder, ViewerError
from .server import serve
from .state import load_state, validate_state

# Debian's Chromium, headless and offline, as the tests and benchmarks/viewer.py drive it (without the
# background-networking flags Chromium keeps trying connections that an offline machine refuses)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

__all__ = ["CHROMIUM_FLAGS", "GraphFolder", "ViewerError", "load_state", "serve", "validate_state"]
