"""Checkpoint formats beyond the native one (`CrossLayerTranscoder.save_pretrained`):
circuit-tracer's cross-layer-transcoder layout, export and import, and a loader that accepts any
of them (docs/DESIGN.md §5).

circuit-tracer layout (one pair of files per source layer l, normalisation folded in):

    config.yaml            model_kind: cross_layer_transcoder, model_name, feature_input_hook,
                           feature_output_hook, activation (+ k for TopK); `clt:` holds our
                           architecture for an exact import
    W_enc_{l}.safetensors  W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F] (JumpReLU)
    W_dec_{l}.safetensors  W_dec_{l} [F, L − l, d]   (slot j writes layer l + j)

BatchTopK exports as JumpReLU with its per-layer inference threshold on every feature (the same
function). circuit-tracer has no TopK CLT: a TopK export carries `activation: topk` and `k`, which
our import honours; circuit-tracer's own loader would read it as ReLU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .files import atomic_directory
from .model import CheckpointError, CLTArchitecture, CrossLayerTranscoder

HOOK_NAMES = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out"}
HOOKS_BACK = {v: k for k, v in HOOK_NAMES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def export_circuit_tracer(
    clt: CrossLayerTranscoder,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    model_name: str | None = None,
) -> Path:
    """Write `clt` in circuit-tracer's layout (atomically)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    arch = clt.arch
    f = clt.folded().cpu()
    dt = DTYPES[dtype]
    act = arch.activation
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model_name or arch.subject_model,
        "feature_input_hook": HOOK_NAMES[arch.input_hook],
        "feature_output_hook": HOOK_NAMES[arch.output_hook],
        "activation": {"batchtopk": "jumprelu"}.get(act, act),
    }
    if act == "topk":
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
            elif act == "batchtopk":
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
        if arch.activation in ("jumprelu", "batchtopk"):
            theta = torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)]).float()
            if arch.activation == "batchtopk":
                clt.batchtopk_threshold.copy_(theta[:, 0])
            else:
                clt.threshold_param.copy_(theta.log() if arch.log_threshold else theta)
    return clt.to(device)


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
    if (p / "config.yaml").exists() and not (p / "config.json").exists():
        return import_circuit_tracer(p, device)
    from .parallel import is_sharded, load_sharded

    for cand in (p, p / "clt"):
        if cand.is_dir() and is_sharded(cand):  # a feature-sharded checkpoint: reassembled
            return load_sharded(cand, device=device)
    if not (p / "model.safetensors").exists() and (p / "clt" / "model.safetensors").exists():
        p = p / "clt"
    return CrossLayerTranscoder.from_pretrained(p, device)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub: push a trained CLT (native + circuit-tracer export + model card), load one back


def _checkpoint_parts(path: Path) -> tuple[Path, Path | None]:
    """(native checkpoint dir, run dir or None) of a run dir or a native checkpoint dir."""
    if (path / "clt").is_dir():
        return path / "clt", path
    run = path.parent if (path.parent / "config.json").exists() and path.name == "clt" else None
    return path, run


def push_to_hub(
    checkpoint: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    export: bool = True,
    dtype: str = "float32",
) -> str:
    """Upload a trained CLT to the Hub repo `repo_id` (created if needed; `revision`: a branch,
    created from main if needed): the native checkpoint at the repo root (`config.json`,
    `model.safetensors`, as written by training), circuit-tracer's layout under `circuit_tracer/`,
    the feature cards under `features/` (when `clt features` wrote a store for this CLT), a model card (`README.md`: subject model, hooks, architecture, per-layer FVU/L0, CE-loss score,
    how to load), and from a run dir its `report.json`, `loss_curve.png` and training config.
    `checkpoint`: a run dir or a native checkpoint dir (sharded ones are reassembled). Returns the
    commit URL. Uses huggingface_hub (token from `huggingface-cli login` / HF_TOKEN, Hub from
    HF_ENDPOINT)."""
    import shutil
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .card import model_card

    native, run = _checkpoint_parts(Path(checkpoint))
    clt = load_clt(native)
    with tempfile.TemporaryDirectory(prefix="clt-push-") as tmp:
        stage = Path(tmp) / "repo"
        if (native / "model.safetensors").exists():  # the files training wrote, as they are
            stage.mkdir()
            for name in ("config.json", "model.safetensors"):
                shutil.copy2(native / name, stage / name)
        else:  # feature-sharded: one whole checkpoint
            clt.save_pretrained(stage)
        if export:
            export_circuit_tracer(clt, stage / "circuit_tracer", dtype=dtype)
        report, train_cfg = None, None
        if run is not None:
            if (run / "report.json").exists():
                report = json.loads((run / "report.json").read_text())
            train_cfg = json.loads((run / "config.json").read_text())
            for src, dst in (
                ("report.json", "report.json"),
                ("loss_curve.png", "loss_curve.png"),
                ("config.json", "training_config.json"),
            ):
                if (run / src).exists():
                    shutil.copy2(run / src, stage / dst)
        features = _feature_store(run or native, clt)
        if features is not None:  # the feature cards, as `clt features` wrote them
            shutil.copytree(features.dir, stage / "features")
        summary = json.loads((stage / "config.json").read_text()).get("summary", {})
        (stage / "README.md").write_text(
            model_card(
                clt.arch,
                repo_id,
                report or summary,
                train_cfg,
                circuit_tracer=export,
                features=features.manifest if features else None,
            )
        )
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=stage,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message
                or f"Upload CLT ({clt.arch.n_layers} layers × {clt.arch.d_sae} features)",
            )
        except HfHubHTTPError as e:
            raise CheckpointError(f"pushing {checkpoint} to {repo_id} failed: {e}") from e
    return str(getattr(info, "commit_url", info))


def _feature_store(checkpoint: Path, clt: CrossLayerTranscoder):
    """The feature store next to a checkpoint if it was built for this CLT (else None, with a
    warning when it is another CLT's)."""
    import sys

    from .features.pipeline import default_store_dir
    from .features.store import FeatureError, FeatureStore

    d = default_store_dir(checkpoint)
    if not (d / "manifest.json").exists():
        return None
    store = FeatureStore(d)
    try:
        store.check(clt)
    except FeatureError as e:
        print(f"warning: not pushing the feature cards: {e}", file=sys.stderr)
        return None
    return store


def hub_download(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Path:
    """Download a CLT from the Hub into the local cache (huggingface_hub's; offline mode and
    `local_files_only` read only from it) and return its directory: native (`config.json` +
    `model.safetensors`) or circuit-tracer (`config.yaml` + `W_enc_*`/`W_dec_*`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def get(name: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                name,
                subfolder=subfolder or None,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        )

    where = f"{repo_id}" + (f"@{revision}" if revision else "") + (f"/{subfolder}" if subfolder else "")
    try:
        try:
            get("model.safetensors")
            return get("config.json").parent
        except RemoteEntryNotFoundError:  # not native: circuit-tracer's layout
            cfg = get("config.yaml")
        n_layers = (yaml.safe_load(cfg.read_text()).get("clt") or {}).get("architecture", {}).get("n_layers")
        layer = 0
        while n_layers is None or layer < n_layers:
            try:
                get(f"W_enc_{layer}.safetensors")
            except RemoteEntryNotFoundError:
                if n_layers is None and layer > 0:
                    break
                raise
            get(f"W_dec_{layer}.safetensors")
            layer += 1
        return cfg.parent
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"no CLT at {where}: no such local directory, and no such Hub repo (or it needs "
            "a token: HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"no revision {revision!r} in {repo_id}") from e
    except RemoteEntryNotFoundError as e:
        raise CheckpointError(
            f"{where} holds no CLT (neither config.json + model.safetensors nor a circuit-tracer config.yaml)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{where}: no such local directory, and not in the local Hugging Face cache while the Hub cannot be "
            f"reached (offline mode, HF_HUB_OFFLINE, or no network): {e}"
        ) from e


def looks_like_repo_id(name: str) -> bool:
    """ "user/name" or "name", and not a path into a local directory (`runs/x` when `runs/` exists)."""
    parts = str(name).split("/")
    return (
        len(parts) in (1, 2)
        and all(parts)
        and not str(name).startswith((".", "~"))
        and not (len(parts) == 2 and Path(parts[0]).is_dir())
    )
