"""The feature store: circuit-tracer's binary feature layout, plus a manifest (docs/DESIGN.md §8).

    features/index.json.gz   gzip(JSON) {"<layer>": {"filename": "layer_<layer>.bin",
                                                     "offsets": [n_features + 1 ints]}, …}
    features/layer_<l>.bin   feature f's record in bytes [offsets[f], offsets[f+1]): a uint32
                             little-endian length n, then n bytes of gzip-compressed UTF-8 JSON
                             (a card, below); an empty range = no card for that feature
    features/manifest.json   the CLT (checksum of its folded weights), the text and the token count
                             scanned, the settings, and every file's size and sha256

circuit-tracer's frontend reads the records' own fields (index, examples_quantiles, top_logits,
bottom_logits, act_min, act_max, histogram, quantile_values, activation_frequency) and ignores
ours. A store is written whole into a temporary directory and renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import FeatureError  # noqa: F401 (re-exported)
from ..files import atomic_directory, sha256

FORMAT = 1


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature id (schema_version 1)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


# ---------------------------------------------------------------------------------------------
# The card


@dataclass
class Example:
    tokens: list[str]  # the context, one string per token (newlines as ⏎)
    tokens_acts_list: list[float]  # the feature's activation on each of them
    train_token_ind: int  # the token the example is about (the peak or the sample)
    is_repeated_datapoint: bool = False
    token_ids: list[int] = field(default_factory=list)
    token_index: int = -1  # global position of that token in the pass (window · P + offset)
    document: int = -1  # its document in the text stream


@dataclass
class ExampleGroup:
    quantile_name: str  # "Top" or "Interval lo–hi · p%"
    examples: list[Example]
    lo: float = 0.0  # activation range of the group
    hi: float = 0.0
    share: float = 0.0  # fraction of the feature's non-zero activations in the range


@dataclass
class Neighbour:
    layer: int
    feature: int
    weight: float


@dataclass
class FeatureCard:
    transcoder_id: str
    index: int  # cantor(layer, feature)
    layer: int
    feature: int
    dead: bool  # never fired in the tokens scanned
    n_tokens: int  # tokens scanned (counted)
    count: int  # tokens where it fired
    activation_frequency: float  # count / n_tokens
    act_min: float  # colour domain of the examples: 0 … act_max
    act_max: float
    mean_activation: float  # over the tokens where it fired
    min_activation: float
    histogram: list[int]  # equal-width bins over [0, act_max] of the non-zero activations
    quantile_values: list[float]  # 100 quantiles of the non-zero activations
    top_logits: list[str]  # strongest direct logit effects (decoder over all target layers)
    top_logit_values: list[float]
    top_logit_ids: list[int]
    bottom_logits: list[str]
    bottom_logit_values: list[float]
    bottom_logit_ids: list[int]
    decoder_norms: list[float]  # ‖W_dec[layer→t][f]‖ for t = layer … L−1 (subject units)
    downstream: list[Neighbour]  # strongest virtual weights to later features
    upstream: list[Neighbour]  # … from earlier features
    examples_quantiles: list[ExampleGroup]
    log_histogram: list[int] = field(default_factory=list)  # the raw bins: < 1e-3, 32 per decade, ≥ 1e3

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> FeatureCard:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        missing = [f.name for f in fields(cls) if f.name not in d and f.name != "log_histogram"]
        if missing:
            raise FeatureError(f"feature record {d.get('index')!r} lacks {missing}: not a clt feature card")
        kw["downstream"] = [Neighbour(**n) for n in d["downstream"]]
        kw["upstream"] = [Neighbour(**n) for n in d["upstream"]]
        kw["examples_quantiles"] = [
            ExampleGroup(**(g | {"examples": [Example(**e) for e in g["examples"]]}))
            for g in d["examples_quantiles"]
        ]
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Checksums


def clt_checksum(clt) -> str:
    """sha256 of the CLT's folded float32 weights (so a native checkpoint and its circuit-tracer
    export have the same)."""
    h = hashlib.sha256()
    state = clt.folded().state_dict()
    for name in sorted(state):
        t = state[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing and reading


def encode_record(card: dict) -> bytes:
    payload = gzip.compress(json.dumps(card, separators=(",", ":")).encode(), compresslevel=6, mtime=0)
    return struct.pack("<I", len(payload)) + payload


def decode_record(blob: bytes) -> dict:
    (n,) = struct.unpack("<I", blob[:4])
    if n != len(blob) - 4:
        raise FeatureError(f"feature record of {len(blob)} bytes says its payload has {n}")
    return json.loads(gzip.decompress(blob[4 : 4 + n]))


def write_store(out: str | os.PathLike, n_layers: int, d_sae: int, records, manifest: dict) -> Path:
    """Write a store atomically. `records(layer)` yields (feature, record bytes | None) for
    features 0 … d_sae − 1 in order (None: no card). `manifest` is completed with the files."""
    out = Path(out)
    try:
        with atomic_directory(out) as tmp:
            index, files = {}, {}
            for layer in range(n_layers):
                name = f"layer_{layer}.bin"
                offsets, pos = [0], 0
                with open(tmp / name, "wb") as f:
                    for feature, blob in records(layer):
                        assert feature == len(offsets) - 1, "records must come in feature order"
                        if blob is not None:
                            f.write(blob)
                            pos += len(blob)
                        offsets.append(pos)
                    f.flush()
                    os.fsync(f.fileno())
                if len(offsets) != d_sae + 1:
                    raise FeatureError(f"layer {layer}: {len(offsets) - 1} records for {d_sae} features")
                index[str(layer)] = {"filename": name, "offsets": offsets}
            (tmp / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
            for p in sorted(tmp.iterdir()):
                files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
            (tmp / "manifest.json").write_text(
                json.dumps(manifest | {"format": FORMAT, "files": files}, indent=1)
            )
    except OSError as e:
        raise FeatureError(
            f"writing the feature store {out} failed: {e.strerror or e}"
            f"{' (the disk is full)' if getattr(e, 'errno', None) == 28 else ''}; nothing was "
            "written (any earlier store there is unchanged)"
        ) from e
    return out


class FeatureStore:
    """Read the cards of a store: `FeatureStore(dir).card(layer, feature)` -> FeatureCard."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.exists():
            raise FeatureError(
                f"{self.dir} is not a feature store (no manifest.json); compute one with "
                "python -m clt.features CHECKPOINT"
            )
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise FeatureError(
                f"{path}: feature store format {self.manifest.get('format')!r}, this version reads {FORMAT}"
            )
        self.index = json.loads(gzip.decompress((self.dir / "index.json.gz").read_bytes()))

    @classmethod
    def of(cls, checkpoint: str | os.PathLike, **hub) -> FeatureStore:
        """The store of a CLT: next to a local checkpoint, or the `features/` folder of its Hub
        repo (downloaded through huggingface_hub's cache; `hub`: revision, cache_dir,
        local_files_only, token)."""
        from .pipeline import find_store

        d = find_store(str(checkpoint), **hub)
        if d is None:
            raise FeatureError(
                f"{checkpoint} has no feature cards (no features/manifest.json next to it or in its "
                "Hub repo); compute them with python -m clt.features CHECKPOINT"
            )
        return cls(d)

    @property
    def checksum(self) -> str:
        return self.manifest["clt"]["checksum"]

    def check(self, clt, checksum: str | None = None) -> None:
        """Raise unless this store was built for `clt` (same folded weights; or pass its `checksum`)."""
        got = checksum or clt_checksum(clt)
        if got != self.checksum:
            raise FeatureError(
                f"the feature store {self.dir} was built for another CLT "
                f"({self.manifest['clt'].get('source', '?')}, weights sha256 {self.checksum[:12]}…; "
                f"this CLT's is {got[:12]}…): recompute it (python -m clt.features) or point "
                "features.out elsewhere"
            )

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest."""
        for name, meta in self.manifest["files"].items():
            p = self.dir / name
            if not p.exists() or p.stat().st_size != meta["bytes"] or sha256(p) != meta["sha256"]:
                raise FeatureError(f"{p} is missing or damaged (size or sha256 differs from the manifest)")

    def _range(self, layer: int, feature: int) -> tuple[str, int, int]:
        entry = self.index.get(str(layer))
        if entry is None or not 0 <= feature < len(entry["offsets"]) - 1:
            raise FeatureError(
                f"no feature {layer}/{feature} in {self.dir} "
                f"({len(self.index)} layers × {len(entry['offsets']) - 1 if entry else 0} features)"
            )
        return entry["filename"], entry["offsets"][feature], entry["offsets"][feature + 1]

    def has(self, layer: int, feature: int) -> bool:
        _, a, b = self._range(layer, feature)
        return b > a

    def record(self, layer: int, feature: int) -> dict | None:
        name, a, b = self._range(layer, feature)
        if b == a:
            return None
        with open(self.dir / name, "rb") as f:
            f.seek(a)
            return decode_record(f.read(b - a))

    def raw(self, layer: int, feature: int) -> bytes:
        name, a, b = self._range(layer, feature)
        with open(self.dir / name, "rb") as f:
            f.seek(a)
            return f.read(b - a)

    def card(self, layer: int, feature: int) -> FeatureCard:
        rec = self.record(layer, feature)
        if rec is None:
            raise FeatureError(
                f"the store {self.dir} has no card for feature {layer}/{feature} (cards were "
                "computed for some features only: clt attribute --cards, or python -m clt.features)"
            )
        return FeatureCard.from_json(rec)

    def present(self) -> list[torch.Tensor]:
        """Per layer, the features that have a card."""
        out = []
        for layer in range(len(self.index)):
            off = torch.tensor(self.index[str(layer)]["offsets"])
            out.append(torch.nonzero(off[1:] > off[:-1]).flatten())
        return out
