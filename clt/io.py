"""Checkpoint formats beyond the native one (`CrossLayerTranscoder.save_pretrained`):
circuit-tracer's cross-layer-transcoder layout, export and import, and a loader that accepts any
of them (DESIGN.md §5).

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
def export_circuit_tracer(clt: CrossLayerTranscoder, out_dir: str | os.PathLike, dtype: str = "float32",
                          model_name: str | None = None) -> Path:
    """Write `clt` in circuit-tracer's layout (atomically)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    arch = clt.arch
    f = clt.folded().cpu()
    dt = DTYPES[dtype]
    act = arch.activation
    cfg = {"model_kind": "cross_layer_transcoder", "model_name": model_name or arch.subject_model,
           "feature_input_hook": HOOK_NAMES[arch.input_hook], "feature_output_hook": HOOK_NAMES[arch.output_hook],
           "activation": {"batchtopk": "jumprelu"}.get(act, act)}
    if act == "topk":
        cfg["k"] = arch.k
    cfg["clt"] = {"architecture": asdict(arch)}
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        for layer in range(arch.n_layers):
            enc = {f"W_enc_{layer}": f.W_enc[layer], f"b_enc_{layer}": f.b_enc[layer], f"b_dec_{layer}": f.b_dec[layer]}
            if act == "jumprelu":
                enc[f"threshold_{layer}"] = f.threshold[layer]
            elif act == "batchtopk":
                enc[f"threshold_{layer}"] = f.batchtopk_threshold[layer].expand(arch.d_sae)
            save_file({k: v.to(dt).contiguous() for k, v in enc.items()}, tmp / f"W_enc_{layer}.safetensors")
            save_file({f"W_dec_{layer}": f.W_dec[layer].to(dt).contiguous()}, tmp / f"W_dec_{layer}.safetensors")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def import_circuit_tracer(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
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
        raise CheckpointError(f"{d}: model_kind is {cfg.get('model_kind')!r}, expected 'cross_layer_transcoder'")
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
        arch = CLTArchitecture(**ours)
    else:
        has_theta = "threshold_0" in enc[0]
        act = cfg.get("activation") or ("jumprelu" if has_theta else "relu")
        arch = CLTArchitecture(n_layers=n_layers, d_model=dm, d_sae=F, activation=act, k=int(cfg.get("k", 16)),
                               subject_model=cfg.get("model_name") or "",
                               input_hook=HOOKS_BACK.get(cfg.get("feature_input_hook", "hook_resid_mid"), "resid_mid"),
                               output_hook=HOOKS_BACK.get(cfg.get("feature_output_hook", "hook_mlp_out"), "mlp_out"))
    if (arch.n_layers, arch.d_model, arch.d_sae) != (n_layers, dm, F):
        raise CheckpointError(f"{d}: config.yaml says {arch.n_layers}×{arch.d_sae} features of width {arch.d_model}, "
                              f"the files hold {n_layers}×{F} of width {dm}")
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


def load_clt(path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """A CLT from a native checkpoint dir (sharded or not), a training run dir (its `clt/`), or a
    circuit-tracer export."""
    p = Path(path)
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
