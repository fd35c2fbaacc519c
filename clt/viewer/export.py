"""`clt view GRAPH --export graph.html`: one self-contained HTML file (the pruned view of the graph,
the cards of its feature nodes, the viewer's script and style) that opens from disk with no server
and no network (its Content-Security-Policy allows no request at all)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ..files import write_atomic
from .cards import Cards
from .graphs import GraphFolder, ViewerError
from .server import STATIC
from .state import empty_state

EXPORT_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'none'; base-uri 'none'; form-action 'none'"
)


def _script_safe(text: str) -> str:
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def export_html(
    graph_path: str | Path,
    out: str | Path,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    features: str | None = None,
) -> Path:
    """graph_path: a `{slug}.pt` (or its `{slug}.json`, or a folder with one graph) -> out."""
    p = Path(graph_path)
    if p.is_dir():
        pts = sorted(p.glob("*.pt"))
        if len(pts) != 1:
            raise ViewerError(f"{p} holds {len(pts)} graphs (.pt files): name one")
        p = pts[0]
    if p.suffix == ".json":
        p = p.with_suffix(".pt")
    if p.suffix != ".pt" or not p.exists():
        raise ViewerError(
            f"{graph_path}: no full graph ({p.name} is missing); clt attribute writes {{slug}}.pt"
        )
    folder = GraphFolder(p.parent)
    g = folder.get(p.stem)
    state_path = folder.path(p.stem, ".state.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else empty_state(p.stem)
    nt = node_threshold or state.get("node_threshold") or 0.8
    et = edge_threshold or state.get("edge_threshold") or 0.98
    v = g.view(nt, et)
    view = g.view_json(v)
    cards = Cards(folder, features)
    cards_of_nodes = {n["id"]: cards.node_card(g, n) for n in view["nodes"] if n["kind"] == "feature"}
    state = state | {"node_threshold": nt, "edge_threshold": et}
    data = {
        "view": view,
        "edges": base64.b64encode(v.edges_blob()).decode(),
        "cards": cards_of_nodes,
        "state": state,
    }
    html = (STATIC / "index.html").read_text()
    css = (STATIC / "viewer.css").read_text()
    js = (STATIC / "viewer.js").read_text()
    head = f'<meta http-equiv="Content-Security-Policy" content="{EXPORT_CSP}">'
    html = html.replace('<meta charset="utf-8">', '<meta charset="utf-8">\n' + head, 1)
    html = html.replace('<link rel="stylesheet" href="/static/viewer.css">', f"<style>\n{css}</style>", 1)
    html = html.replace(
        '<script type="module" src="/static/viewer.js"></script>',
        f'<script id="clt-data" type="application/json">{_script_safe(json.dumps(data))}</script>\n'
        f'<script type="module">\n{_script_safe(js)}</script>',
        1,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, html)
    return out
