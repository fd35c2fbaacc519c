"""The model card (README.md) pushed to the Hub with a trained CLT: YAML front matter that the Hub
indexes (library, tags, base model, datasets, headline metrics), then the subject model, hooks,
architecture, per-layer FVU/L0 table, spliced-in CE-loss score and how to load it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import yaml

from .config import K_ACTIVATIONS
from .model import CLTArchitecture

# hub names of the bundled subject models and of the dataset presets (for the card's metadata)
BUNDLED_HUB = {"bundled:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DATASET_HUB = {
    "fineweb": "HuggingFaceFW/fineweb",
    "fineweb-edu": "HuggingFaceFW/fineweb-edu",
    "openwebtext": "Skylion007/openwebtext",
}


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def model_card(
    arch: CLTArchitecture,
    repo_id: str,
    metrics: dict | None,
    train_cfg: dict | None,
    circuit_tracer: bool = True,
    features: dict | None = None,
) -> str:
    """metrics: the run's report.json (or the checkpoint's summary): fvu_per_layer, l0_per_layer,
    eval/* ...; train_cfg: the run's config.json."""
    m, cfg = metrics or {}, train_cfg or {}
    subject = BUNDLED_HUB.get(arch.subject_model, arch.subject_model)
    dataset = (cfg.get("data") or {}).get("dataset")
    front: dict[str, Any] = {
        "library_name": "clt",
        "tags": [
            "cross-layer-transcoder",
            "interpretability",
            "circuit-tracer",
            "sparse-autoencoder",
            arch.activation,
        ],
    }
    if "/" in subject and not subject.startswith(("/", ".")):
        front["base_model"] = subject
    if dataset in DATASET_HUB:
        front["datasets"] = [DATASET_HUB[dataset]]
    headline: dict[str, Any] = {
        k: m.get(k) for k in ("fvu", "l0", "eval/ce_loss_score", "eval/kl_spliced") if m.get(k) is not None
    }
    if headline:
        front["clt_metrics"] = {k.split("/")[-1]: round(float(v), 6) for k, v in headline.items()}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Cross-layer transcoder for {subject}",
        "",
        f"A {arch.activation} cross-layer transcoder (CLT) trained with `clt` on the MLPs of "
        f"**{subject}**: {arch.n_layers} layers × {arch.d_sae} features (d_model = {arch.d_model}). "
        f"Layer l's features read `{arch.input_hook}` at layer l "
        f"and write `{arch.output_hook}` at layer l and every later layer.",
        "",
        "| | |",
        "|---|---|",
        f"| subject model | `{subject}` |",
        f"| input hook | `{arch.input_hook}` |",
        f"| output hook | `{arch.output_hook}` |",
        f"| activation | {arch.activation}"
        + (
            f" (k = {arch.k}{' per layer, chosen across layers' if arch.topk_scope == 'all' else ''})"
            if arch.activation in K_ACTIVATIONS
            else ""
        )
        + " |",
        f"| features per layer | {arch.d_sae} |",
    ]
    if dataset:
        lines.append(f"| training text | `{dataset}` |")
    if m.get("steps"):
        batch = (cfg.get("trainer") or {}).get("batch_tokens")
        lines.append(
            f"| steps | {m['steps']}" + (f" ({m['steps'] * batch:,} tokens)" if batch else "") + " |"
        )
    fvu, l0 = m.get("fvu_per_layer"), m.get("l0_per_layer")
    if fvu and l0:
        lines += [
            "",
            f"## Reconstruction (held-out, {m.get('held_out_tokens', '?')} tokens)",
            "",
            "| layer | FVU | L0 |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {i} | {f:.4f} | {z:.1f} |" for i, (f, z) in enumerate(zip(fvu, l0))]
        lines.append(f"| **mean** | **{sum(fvu) / len(fvu):.4f}** | **{sum(l0) / len(l0):.1f}** |")
    if m.get("eval/ce_loss_score") is not None:
        lines += [
            "",
            "## Replacement model (the CLT spliced into every MLP)",
            "",
            "| CE clean | CE spliced | CE zero-ablated MLPs | KL(clean ‖ spliced) | CE-loss score |",
            "|---:|---:|---:|---:|---:|",
            f"| {_fmt(m.get('eval/ce_loss_clean'))} | {_fmt(m.get('eval/ce_loss_spliced'))} | "
            f"{_fmt(m.get('eval/ce_loss_zero_ablation'))} | {_fmt(m.get('eval/kl_spliced'))} | "
            f"{_fmt(m.get('eval/ce_loss_score'))} |",
            "",
            "CE-loss score: the fraction of the CE gap between zero-ablated MLPs and the clean model that "
            "the CLT recovers.",
        ]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "from clt.model import CrossLayerTranscoder",
        "",
        f'clt = CrossLayerTranscoder.from_pretrained("{repo_id}")          # native (this folder)',
        "features = clt.encode_activate(x)[1]   # x: [N, L, d] inputs at every layer",
        "```",
        "",
    ]
    if circuit_tracer:
        lines += [
            "`circuit_tracer/` holds the same CLT in circuit-tracer's layout (`config.yaml`, "
            "`W_enc_{l}.safetensors`, `W_dec_{l}.safetensors`, normalisation folded in):",
            "",
            "```python",
            f'clt = CrossLayerTranscoder.from_pretrained("{repo_id}", subfolder="circuit_tracer")',
            "```",
            "",
            "or point circuit-tracer's transcoder loader at that folder.",
            "",
        ]
    if features:
        text = features.get("text", {})
        lines += [
            "## Feature cards",
            "",
            f"`features/` holds a card for {'every' if features.get('complete') else 'some'} feature "
            f"(firing frequency, activation histogram and quantiles, max-activating contexts, logit effects "
            f"through all target layers, virtual-weight neighbours), computed over "
            f"{features.get('n_tokens', 0):,} tokens of `{text.get('dataset', '?')}`, in circuit-tracer's "
            "binary feature layout: its frontend shows them for graphs whose `scan` is this repo.",
            "",
            "```python",
            "from clt.features import FeatureStore",
            "",
            f'card = FeatureStore.of("{repo_id}").card(layer, feature)',
            "```",
            "",
        ]
    lines += ["## Architecture", "", "```json", json.dumps(asdict(arch), indent=2), "```", ""]
    if cfg:
        lines += [
            "## Training configuration",
            "",
            "<details><summary>config.json</summary>",
            "",
            "```yaml",
            yaml.safe_dump(cfg, sort_keys=False).strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)
