"""The viewer's saved state: `{slug}.state.json`, a sidecar next to the graph (the graph file is
never rewritten). Written atomically (temporary file + rename), checked against the schema below
before anything is written. It is an API: read it from Python with `load_state(path)`.

    {
      "format": "clt-viewer-state",  "version": 1,
      "slug": str,                                   # the graph it belongs to
      "pinned": [node_id, ...],                      # the subgraph's nodes (circuit-tracer node ids)
      "supernodes": [{"label": str, "members": [node_id, ...]}, ...],   # members are pinned nodes
      "labels": {"features": {"<layer>/<feature>": str},   # a feature's label, at every position
                 "nodes": {node_id: str}},                 # one node's label (wins over the feature's)
      "clicked": node_id | "",
      "node_threshold": float | null, "edge_threshold": float | null,  # the sliders, (0, 1]
      "positions": {node_id: [x, y]}                 # subgraph layout, 0…1 of the pane
    }

circuit-tracer's `qParams` (`pinnedIds` as a list or comma string, `supernodes` as a list or a JSON
string, `clerps` as [[cantor, label]] pairs) import through `from_qparams`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .graphs import ViewerError

FORMAT, VERSION = "clt-viewer-state", 1
MAX_BYTES = 16 << 20
MAX_LABEL = 400
MAX_PINNED = 2000


def empty_state(slug: str) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "slug": slug,
        "pinned": [],
        "supernodes": [],
        "labels": {"features": {}, "nodes": {}},
        "clicked": "",
        "node_threshold": None,
        "edge_threshold": None,
        "positions": {},
    }


def _fail(msg: str):
    raise ViewerError(f"bad viewer state: {msg}")


def _label(x, where: str) -> str:
    if not isinstance(x, str) or len(x) > MAX_LABEL:
        _fail(f"{where} must be a string of at most {MAX_LABEL} characters")
    return x


def validate_state(d, slug: str, node_ids) -> dict:
    """The state `d` checked against the schema and the graph's node ids -> a normalised copy.
    Raises ViewerError (HTTP 400) naming the first bad field."""
    if not isinstance(d, dict):
        _fail("not a JSON object")
    allowed = set(empty_state(slug))
    extra = sorted(set(d) - allowed)
    if extra:
        _fail(f"unknown keys {extra} (allowed: {sorted(allowed)})")
    if d.get("format", FORMAT) != FORMAT or d.get("version", VERSION) != VERSION:
        _fail(f"format must be {FORMAT!r} version {VERSION}")
    if d.get("slug", slug) != slug:
        _fail(f"it belongs to graph {d.get('slug')!r}, not {slug!r}")
    out = empty_state(slug)

    def node(x, where):
        if not isinstance(x, str) or x not in node_ids:
            _fail(f"{where}: {x!r} is not a node of graph {slug!r}")
        return x

    pinned = d.get("pinned", [])
    if not isinstance(pinned, list) or len(pinned) > MAX_PINNED:
        _fail(f"pinned must be a list of at most {MAX_PINNED} node ids")
    out["pinned"] = list(dict.fromkeys(node(x, "pinned") for x in pinned))
    sns = d.get("supernodes", [])
    if not isinstance(sns, list):
        _fail("supernodes must be a list")
    seen: set[str] = set()
    for i, sn in enumerate(sns):
        if not isinstance(sn, dict) or set(sn) != {"label", "members"} or not isinstance(sn["members"], list):
            _fail(f"supernodes[{i}] must be {{'label': str, 'members': [node_id, ...]}}")
        members = [node(x, f"supernodes[{i}].members") for x in sn["members"]]
        if len(members) < 2 or len(set(members)) != len(members):
            _fail(f"supernodes[{i}] needs at least two distinct members")
        if not set(members) <= set(out["pinned"]):
            _fail(f"supernodes[{i}]: every member must be pinned")
        if seen & set(members):
            _fail(f"supernodes[{i}]: a node belongs to at most one supernode")
        seen |= set(members)
        out["supernodes"].append({"label": _label(sn["label"], f"supernodes[{i}].label"), "members": members})
    labels = d.get("labels", {"features": {}, "nodes": {}})
    if not isinstance(labels, dict) or not set(labels) <= {"features", "nodes"}:
        _fail("labels must be {'features': {...}, 'nodes': {...}}")
    for key, value in (labels.get("features") or {}).items():
        if not re.fullmatch(r"\d+/\d+", key):
            _fail(f"labels.features key {key!r} must be '<layer>/<feature>'")
        out["labels"]["features"][key] = _label(value, f"labels.features[{key!r}]")
    for key, value in (labels.get("nodes") or {}).items():
        out["labels"]["nodes"][node(key, "labels.nodes")] = _label(value, f"labels.nodes[{key!r}]")
    clicked = d.get("clicked", "")
    out["clicked"] = "" if clicked in ("", None) else node(clicked, "clicked")
    for key in ("node_threshold", "edge_threshold"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            _fail(f"{key} must be null or a number in (0, 1]")
        out[key] = v
    positions = d.get("positions", {})
    if not isinstance(positions, dict):
        _fail("positions must be an object")
    for key, xy in positions.items():
        ok = (
            isinstance(xy, list)
            and len(xy) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in xy)
        )
        if not ok:
            _fail(f"positions[{key!r}] must be [x, y]")
        out["positions"][node(key, "positions")] = [float(xy[0]), float(xy[1])]
    return out


def from_qparams(q, slug: str, node_ids, cantor_to_feature=None) -> dict:
    """circuit-tracer's saved `qParams` (either the file form or the Save button's URL-string form)
    -> our state. `cantor_to_feature(c)` -> "layer/feature" for its clerps."""
    if not isinstance(q, dict):
        _fail("qParams must be an object")
    pinned = q.get("pinnedIds") or []
    if isinstance(pinned, str):
        pinned = [x for x in pinned.split(",") if x]
    sns = q.get("supernodes") or []
    if isinstance(sns, str):
        try:
            sns = json.loads(sns) if sns else []
        except json.JSONDecodeError:
            _fail("qParams.supernodes is not JSON")
    state: dict[str, Any] = {
        "pinned": pinned,
        "clicked": q.get("clickedId") or "",
        "supernodes": [
            {"label": str(s[0]), "members": list(s[1:])} for s in sns if isinstance(s, list) and s
        ],
    }
    clerps: Any = q.get("clerps") or []
    if isinstance(clerps, str):
        try:
            clerps = json.loads(clerps) if clerps else []
        except json.JSONDecodeError:
            _fail("qParams.clerps is not JSON")
    if clerps and cantor_to_feature is not None:
        state["labels"] = {
            "features": {cantor_to_feature(int(c)): str(lab) for c, lab in clerps},
            "nodes": {},
        }
    # supernode members must be pinned in our schema; circuit-tracer pins them implicitly
    state["pinned"] = list(
        dict.fromkeys([*state["pinned"], *(m for s in state["supernodes"] for m in s["members"])])
    )
    return validate_state(state, slug, node_ids)


def write_state(path: Path, state: dict) -> None:
    """Atomically: a kill at any moment leaves the old file or the new one, never a torn one."""
    text = json.dumps(state, indent=1)
    if len(text) > MAX_BYTES:
        _fail(f"{len(text)} bytes is more than {MAX_BYTES}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    """Read a sidecar (`{slug}.state.json`) -> the state dict (the schema above, not re-checked
    against the graph)."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != FORMAT:
        raise ViewerError(f"{path} is not a clt viewer state file")
    return d
