"""Where the viewer finds feature cards: the store named by `--features`, else by the graph's scan
(a local store's absolute path, or a Hub repo id whose cards are in the local Hub cache), else by
any graph of the folder. Stores and records are read once and cached (the server and the export
share this)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ViewerError
from ..features.store import FeatureStore
from .graphs import GraphFolder, LoadedGraph

NO_STORE = (
    "no feature cards found for this CLT (scan {scan!r}): compute them with python -m clt.features "
    "CHECKPOINT, or clt serve --features DIR"
)
NO_CARD = "the store has no card for this feature (clt attribute --cards computes them)"


class Cards:
    def __init__(self, folder: GraphFolder, features: str | None = None):
        self.folder, self.features = folder, features
        self._hub: dict[str, Path | None] = {}
        self._stores: dict[Path, tuple[FeatureStore, int]] = {}
        self._records: dict[tuple[Path, int, int, int], dict | None] = {}

    def store_dir(self, scan: str = "") -> Path | None:
        """--features, else the graph's scan when it is a local store, else the store of the first
        graph whose scan is one."""
        cands = [self.features] if self.features else []
        cands.append(scan)
        if not self.features and not scan:
            for g in self.folder.listing():
                try:
                    cands.append(self.folder.get(g["slug"]).graph.scan)
                except ViewerError:
                    continue
        for c in cands:
            if c and os.path.isabs(c) and (Path(c) / "manifest.json").is_file():
                return Path(c)
        for c in cands:  # a Hub CLT's scan is its repo id: its cards, if they are in the local Hub cache
            if c and not os.path.isabs(c):
                if c not in self._hub:
                    from ..features.pipeline import find_store

                    try:
                        self._hub[c] = find_store(c, local_files_only=True)
                    except Exception:  # noqa: BLE001 (not a repo id, not cached: no cards)
                        self._hub[c] = None
                if self._hub[c] is not None:
                    return self._hub[c]
        return None

    def record(self, store: Path, layer: int, feature: int) -> dict | None:
        """The card record of a feature (None when the store has none). A store is re-read when
        its manifest changes (`clt attribute --cards` adds cards while the server runs)."""
        version = (store / "manifest.json").stat().st_mtime_ns
        key = (store, version, layer, feature)
        if key not in self._records:
            if len(self._records) > 50_000:
                self._records.clear()
            if self._stores.get(store, (None, -1))[1] != version:  # its manifest and offset index, once
                self._stores[store] = (FeatureStore(store), version)
            self._records[key] = self._stores[store][0].record(layer, feature)
        return self._records[key]

    def node_card(self, g: LoadedGraph, node: dict) -> dict:
        """A feature node's card, its activation on every prompt token, and why the card is
        missing when it is."""
        out = {
            "node": node["id"],
            "prompt_acts": g.feature_activations(node["layer"], node["feature"]),
            "card": None,
            "reason": "",
        }
        store = self.store_dir(g.graph.scan)
        if store is None:
            out["reason"] = NO_STORE.format(scan=g.graph.scan)
        else:
            out["card"] = self.record(store, node["layer"], node["feature"])
            if out["card"] is None:
                out["reason"] = NO_CARD
        return out
