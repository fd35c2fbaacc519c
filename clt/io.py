"""Checkpoint formats, and the one loader that tells them apart (docs/DESIGN.md §5).

native (`save_native`, what training writes; `CrossLayerTranscoder.save_pretrained`):

    config.json            format_version, architecture (CLTArchitecture), normalisation
                           (input_scale, output_scale: [L]), summary (the run's metrics)
    model.safetensors      the state dict: W_enc [L, F, d], b_enc [L, F], W_dec.{s} [F, L − s, d],
                           b_dec [L, d], threshold_param [L, F] (JumpReLU), the scale buffers

sharded native (feature-sharded training): `shard-{r:03d}-of-{n:03d}/`, one native checkpoint per
shard of the features, reassembled on load (or re-split into any number of shards dividing F).

circuit-tracer layout (one pair of files per source layer l, normalisation folded in):

    config.yaml            model_kind: cross_layer_transcoder, model_name, feature_input_hook,
                           feature_output_hook, activation (+ k for TopK); `clt:` holds our
                           architecture for an exact import
    W_enc_{l}.safetensors  W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F] (JumpReLU)
    W_dec_{l}.safetensors  W_dec_{l} [F, L − l, d]   (slot j writes layer l + j)

BatchTopK exports as JumpReLU with its per-layer inference threshold on every feature (the same
function). circuit-tracer has no TopK CLT: a TopK export carries `activation: topk` and `k`, which
our import honours; circuit-tracer's own loader would read it as ReLU.

`load_clt(path)` reads any of them, from a run dir (its `clt/`), a checkpoint dir or a Hub repo id
(downloaded by clt/hub.py); `checkpoint_format(dir)` is the one place that decides which it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import WEIGHT_DTYPES
from .errors import CheckpointError, ShardingError
from .files import atomic_directory, sha256
from .hub import hub_download, looks_like_repo_id
from .model import CLTArchitecture, CrossLayerTranscoder
from .parallel import shard_clt, unshard_clt

FORMAT_VERSION = 1
HOOK_NAMES = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out"}
HOOKS_BACK = {v: k for k, v in HOOK_NAMES.items()}


@torch.no_grad()
def export_circuit_tracer(
    clt: CrossLayerTranscoder,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    model_name: str | None = None,
) -> Path:
    """Write `clt` in circuit-tracer's layout (atomically)."""
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
    arch = clt.arch
    f = clt.folded().cpu()
    dt = getattr(torch, dtype)
    act = arch.activation
    cfg: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model_name or arch.subject_model,
        "feature_input_hook": HOOK_NAMES[arch.input_hook],
        "feature_output_hook": HOOK_NAMES[arch.output_hook],
        "activation": "jumprelu" if clt.inference_threshold else act,
    }
    if act == "topk" and not clt.inference_threshold:
        cfg["k"] = arch.k
    cfg["clt"] = {"architecture": asdict(arch)}
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        for layer in range(arch.n_layers):
            enc = {
                f"W_enc_{layer}": f.W_enc[layer],
                f"b_enc_{layer}": f.b_enc[layer],
                f"b_dec_{layer}": f.b_dec[layer],
            }
            if act == "jumprelu":
                enc[f"threshold_{layer}"] = f.threshold[layer]
            elif clt.inference_threshold:  # BatchTopK, cross-layer TopK: one threshold per layer
                enc[f"threshold_{layer}"] = f.batchtopk_threshold[layer].expand(arch.d_sae)
            save_file({k: v.to(dt).contiguous() for k, v in enc.items()}, tmp / f"W_enc_{layer}.safetensors")
            save_file(
                {f"W_dec_{layer}": f.W_dec[layer].to(dt).contiguous()}, tmp / f"W_dec_{layer}.safetensors"
            )
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def import_circuit_tracer(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> CrossLayerTranscoder:
    """Read a CLT in circuit-tracer's layout (ours or any other) into a CrossLayerTranscoder
    (normalisation scales 1: they are folded into the weights)."""
    d = Path(directory)
    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except FileNotFoundError:
        raise CheckpointError(f"{d} has no config.yaml: not a circuit-tracer transcoder") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"unreadable {d / 'config.yaml'}: {e}") from e
    if cfg.get("model_kind") != "cross_layer_transcoder":
        raise CheckpointError(
            f"{d}: model_kind is {cfg.get('model_kind')!r}, expected 'cross_layer_transcoder'"
        )
    n_layers = 0
    while (d / f"W_enc_{n_layers}.safetensors").exists():
        n_layers += 1
    if n_layers == 0:
        raise CheckpointError(f"{d}: no W_enc_0.safetensors")
    try:
        enc = [load_file(d / f"W_enc_{i}.safetensors") for i in range(n_layers)]
        dec = [load_file(d / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
    except Exception as e:
        raise CheckpointError(f"{d}: unreadable or missing transcoder files: {e}") from e
    F, dm = enc[0]["W_enc_0"].shape
    ours = (cfg.get("clt") or {}).get("architecture")
    if ours:
        arch = CLTArchitecture.from_saved(ours)
    else:
        has_theta = "threshold_0" in enc[0]
        act = cfg.get("activation") or ("jumprelu" if has_theta else "relu")
        arch = CLTArchitecture(
            n_layers=n_layers,
            d_model=dm,
            d_sae=F,
            activation=act,
            k=int(cfg.get("k", 16)),
            subject_model=cfg.get("model_name") or "",
            input_hook=HOOKS_BACK.get(cfg.get("feature_input_hook", "hook_resid_mid"), "resid_mid"),
            output_hook=HOOKS_BACK.get(cfg.get("feature_output_hook", "hook_mlp_out"), "mlp_out"),
        )
    if (arch.n_layers, arch.d_model, arch.d_sae) != (n_layers, dm, F):
        raise CheckpointError(
            f"{d}: config.yaml says {arch.n_layers}×{arch.d_sae} features of width {arch.d_model}, "
            f"the files hold {n_layers}×{F} of width {dm}"
        )
    clt = CrossLayerTranscoder(arch)
    with torch.no_grad():
        clt.W_enc.copy_(torch.stack([e[f"W_enc_{i}"] for i, e in enumerate(enc)]).float())
        clt.b_enc.copy_(torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]).float())
        clt.b_dec.copy_(torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]).float())
        for i, w in enumerate(dec):
            clt.W_dec[i].copy_(w.float())
        if arch.activation == "jumprelu" or clt.inference_threshold:
            theta = torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)]).float()
            if clt.inference_threshold:
                clt.batchtopk_threshold.copy_(theta[:, 0])
            else:
                clt.threshold_param.copy_(theta.log() if arch.log_threshold else theta)
    return clt.to(device)


# ---------------------------------------------------------------------------------------------
# Native checkpoints, sharded or not


def save_native(clt: CrossLayerTranscoder, directory: str | os.PathLike, summary: dict | None = None) -> Path:
    """Write `config.json` + `model.safetensors` atomically (temp dir, then rename)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in clt.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "clt"})
        config = {
            "format_version": FORMAT_VERSION,
            "architecture": asdict(clt.arch),
            "normalisation": {
                "input_scale": clt.input_scale.tolist(),
                "output_scale": clt.output_scale.tolist(),
            },
            "summary": summary or {},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        sums = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256(tmp / n)} for n in NATIVE_FILES}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    return directory


NATIVE_FILES = ("config.json", "model.safetensors")
CHECKSUMS = "checksums.json"  # each native file's size and sha256, written with them


def verify_native(directory: str | os.PathLike, full: bool = True) -> str | None:
    """Why a native (or sharded) checkpoint directory cannot be trusted, None when its files
    match their checksums (`full=False`: sizes only, no hashing). A directory from before
    checksums is checked for its files only."""
    directory = Path(directory)
    shards = sorted(directory.glob("shard-*-of-*"))
    for d in shards or [directory]:
        for n in NATIVE_FILES:
            if not (d / n).exists():
                return f"{d / n} is missing"
        try:
            sums = json.loads((d / CHECKSUMS).read_text()) if (d / CHECKSUMS).exists() else {}
        except ValueError as e:
            return f"unreadable {d / CHECKSUMS} ({e})"
        for n, want in sums.items():
            size = (d / n).stat().st_size
            if size != want["bytes"]:
                return f"{d / n} has {size:,} bytes, its checksum file says {want['bytes']:,} (truncated?)"
            if full and sha256(d / n) != want["sha256"]:
                return f"{d / n} does not match its sha256 (damaged on disk)"
    return None


def load_native(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a native checkpoint directory (config.json + model.safetensors)."""
    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise CheckpointError(
            f"{directory} is not a CLT checkpoint: expected config.json and model.safetensors"
        )
    try:
        config = json.loads(cfg_path.read_text())
        arch = CLTArchitecture.from_saved(config["architecture"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable CLT config {cfg_path}: {e}") from e
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:
        raise CheckpointError(f"unreadable CLT weights {weights}: {e}") from e
    model = CrossLayerTranscoder(arch).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {weights} do not match config.json: {e}") from e
    return model


def shard_dir(directory: str | os.PathLike, shard: int, n_shards: int) -> Path:
    return Path(directory) / f"shard-{shard:03d}-of-{n_shards:03d}"


def save_sharded(
    local: CrossLayerTranscoder, directory: str | os.PathLike, summary: dict | None = None
) -> Path:
    """Each feature shard's process writes its own shard (atomically) under `directory`."""
    info = local.arch.extra.get("shard")
    if info is None:
        raise ShardingError("save_sharded needs a shard made by shard_clt")
    return save_native(local, shard_dir(directory, info["rank"], info["world"]), summary=summary)


def load_sharded(
    directory: str | os.PathLike,
    shard: int | None = None,
    n_shards: int | None = None,
    device: str | torch.device = "cpu",
) -> CrossLayerTranscoder:
    """The full CLT from a sharded checkpoint (shard=None), or its shard `shard` of `n_shards` for
    any number of shards dividing the feature count."""
    found = sorted(Path(directory).glob("shard-*-of-*"))
    counts = {int(p.name.split("-of-")[1]) for p in found}
    if len(counts) != 1:
        raise ShardingError(
            f"{directory}: expected the shards of one sharding, found {[p.name for p in found]}"
        )
    saved = counts.pop()
    missing = [r for r in range(saved) if not shard_dir(directory, r, saved).exists()]
    if missing:
        raise ShardingError(f"{directory}: shards {missing} of {saved} are missing")
    full = unshard_clt([load_native(shard_dir(directory, r, saved), device) for r in range(saved)])
    if shard is None:
        return full
    return shard_clt(full, shard, n_shards or 1)


# ---------------------------------------------------------------------------------------------
# The one loader


def _run_dir_native(directory: Path) -> Path:
    """A run dir's native CLT: `clt/`, or `clt.previous/` (the save before it) with a warning when
    `clt/` is missing or fails its checksums' sizes (a save cut short, a damaged disk)."""
    import sys

    native, previous = directory / "clt", directory / "clt.previous"
    if not previous.exists():
        return native
    why = verify_native(native, full=False) if native.exists() else f"{native} is missing"
    if why is None:
        return native
    print(f"warning: {why}; loading the previous save, {previous}", file=sys.stderr)
    return previous


def checkpoint_format(directory: Path) -> tuple[str, Path]:
    """("native" | "sharded" | "circuit-tracer", the checkpoint's own directory) of a checkpoint
    dir or a run dir (whose checkpoint is `clt/`, else `clt.previous/`)."""
    for d in (directory, _run_dir_native(directory)):
        if (d / "model.safetensors").exists():
            return "native", d
        if (d / "config.yaml").exists() and not (d / "config.json").exists():
            return "circuit-tracer", d
        if d.is_dir() and any(d.glob("shard-*-of-*")):
            return "sharded", d
    if (directory / "config.json").exists() and not (directory / "clt").is_dir():
        return "native", directory  # its weights are missing: load_native says so
    raise CheckpointError(
        f"{directory} is not a CLT checkpoint: expected config.json + model.safetensors (native), "
        "shard-*-of-*/ (sharded), config.yaml + W_enc_*/W_dec_* (circuit-tracer), or a run dir with clt/"
    )


def load_clt(path: str | os.PathLike, device: str | torch.device = "cpu", **hub) -> CrossLayerTranscoder:
    """A CLT from a native checkpoint dir (sharded or not), a training run dir (its `clt/`), a
    circuit-tracer export, or a Hub repo id ("user/name"; `hub`: revision, subfolder, cache_dir,
    local_files_only, token)."""
    p = Path(path)
    if not p.exists() and looks_like_repo_id(str(path)):
        p = hub_download(str(path), **hub)
    elif hub.get("subfolder"):
        p = p / hub["subfolder"]
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    kind, d = checkpoint_format(p)
    if kind == "circuit-tracer":
        return import_circuit_tracer(d, device)
    if kind == "sharded":
        return load_sharded(d, device=device)
    return load_native(d, device)
