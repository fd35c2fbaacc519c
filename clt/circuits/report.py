"""`clt heads MODEL`: every head of a model scored from its weights and from its attention on repeated
random tokens, written as one folder:

    heads.md           the top heads per score and the strongest compositions (also printed)
    scores.safetensors induction, duplicate, previous, copying [L, H]; K, Q, V composition [L, H, L, H]
    patterns.png       heatmaps (layer × head) of the four per-head scores
    composition.png    heatmaps of the K/Q/V composition of every (earlier head, later head) pair
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CircuitError
from ..files import atomic_directory
from .heads import Heads
from .patterns import HeadScores, head_scores, uniform_baseline
from .weights import Composition, composition_scores, copying_scores


@dataclass
class HeadsReport:
    name: str
    patterns: HeadScores
    copying: torch.Tensor  # [L, H]
    composition: Composition
    d_model: int


def analyse(
    model: Any,
    name: str = "",
    n: int = 50,
    batch: int = 4,
    seed: int = 0,
    offset: int = 0,
    family: str = "auto",
    pool: torch.Tensor | None = None,
) -> HeadsReport:
    heads = Heads(model, family)
    print(
        f"{name or 'model'}: {len(heads)} layers × {heads.n_heads} heads "
        f"(d={heads.d_model}, D={heads.head_dim})"
    )
    print("  attention on repeated random tokens …", flush=True)
    pats = head_scores(model, n=n, batch=batch, seed=seed, pool=pool)
    print("  OV eigenvalues (copying) …", flush=True)
    copy = copying_scores(heads)
    print("  composition of every head pair …", flush=True)
    comp = composition_scores(heads, offset=offset)
    return HeadsReport(name, pats, copy, comp, heads.d_model)


def _top(score: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    flat = score.flatten()
    idx = flat.argsort(descending=True)[:k].tolist()
    H = score.shape[-1]
    return [(i // H, i % H, float(flat[i])) for i in idx]


def _top_pairs(score: torch.Tensor, k: int) -> list[tuple[int, int, int, int, float]]:
    L, H = score.shape[:2]
    flat = score.flatten()
    out = []
    for i in flat.argsort(descending=True)[:k].tolist():
        a, rest = divmod(i, H * L * H)
        ha, rest = divmod(rest, L * H)
        b, hb = divmod(rest, H)
        out.append((a, ha, b, hb, float(flat[i])))
    return out


def tables(rep: HeadsReport, top: int = 10) -> str:
    p, c = rep.patterns, rep.composition
    base = uniform_baseline(p.n)
    lines = [
        f"# Attention heads of {rep.name or 'the model'}",
        "",
        f"Repeated random tokens: {p.batch} sequences of BOS + 2 × {p.n} distinct ids. "
        f"Next-token loss on the first copy {p.loss_first:.3f}, on the second {p.loss_second:.3f} nats. "
        f"Uniform attention scores {base:.4f} on induction and duplicate. "
        f"Composition baseline (random heads of these shapes) {c.baseline:.4f} "
        f"(1/√d = {1 / math.sqrt(rep.d_model):.4f}).",
        "",
        "| rank | induction head | score | previous-token head | score | duplicate-token head | score |"
        " copying head | eigen-positivity |",
        "|---:|---|---:|---|---:|---|---:|---|---:|",
    ]
    cols = [_top(p.induction, top), _top(p.previous, top), _top(p.duplicate, top), _top(rep.copying, top)]
    for r in range(min(top, p.induction.numel())):
        cells = []
        for col in cols:
            m, h, s = col[r]
            cells += [f"L{m}.H{h}", f"{s:.3f}"]
        lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| rank | K-composition | score | × baseline | Q-composition | score | V-composition | score |",
        "|---:|---|---:|---:|---|---:|---|---:|",
    ]
    pk, pq, pv = _top_pairs(c.K, top), _top_pairs(c.Q, top), _top_pairs(c.V, top)
    for r in range(min(top, len(pk))):
        (a, ha, b, hb, sk), (qa, qha, qb, qhb, sq), (va, vha, vb, vhb, sv) = pk[r], pq[r], pv[r]
        lines.append(
            f"| {r + 1} | L{a}.H{ha} → L{b}.H{hb} | {sk:.3f} | {sk / c.baseline:.1f} | "
            f"L{qa}.H{qha} → L{qb}.H{qhb} | {sq:.3f} | L{va}.H{vha} → L{vb}.H{vhb} | {sv:.3f} |"
        )
    # the K-composition sources of the strongest induction heads: previous-token heads, if induction
    lines += [
        "",
        "Strongest K-composition sources of the top induction heads "
        "(an induction head's keys read what a previous-token head wrote):",
        "",
    ]
    for m, h, s in _top(p.induction, 3):
        if m == 0:
            lines.append(f"- L{m}.H{h} (induction {s:.3f}): layer 0, no earlier heads")
            continue
        src = c.K[:m, :, m, h]
        parts = [f"L{a}.H{ha} {sc:.3f} (prev {float(p.previous[a, ha]):.2f})" for a, ha, sc in _top(src, 3)]
        lines.append(f"- L{m}.H{h} (induction {s:.3f}): " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def plot(rep: HeadsReport, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = rep.patterns
    maps = [
        ("induction", p.induction),
        ("previous token", p.previous),
        ("duplicate token", p.duplicate),
        ("copying (OV eigen-positivity)", rep.copying),
    ]
    L, H = p.induction.shape
    fig, axes = plt.subplots(1, 4, figsize=(4 * max(2.5, 0.35 * H + 1.5), max(3.0, 0.22 * L + 1.5)))
    for ax, (title, s) in zip(axes, maps):
        signed = title.startswith("copying")
        im = ax.imshow(
            s.numpy(),
            aspect="auto",
            cmap="RdBu_r" if signed else "viridis",
            vmin=-1 if signed else 0,
            vmax=1 if signed else max(1e-6, float(s.max())),
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{rep.name or 'model'}: heads on repeated random tokens (n={p.n})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=110)
    plt.close(fig)

    c = rep.composition
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2))
    for ax, (title, s) in zip(axes, (("K", c.K), ("Q", c.Q), ("V", c.V))):
        m = s.reshape(L * H, L * H).numpy()
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=max(1e-6, float(m.max())))
        ax.set_title(f"{title}-composition (baseline {c.baseline:.3f})", fontsize=10)
        ax.set_xlabel("receiving head (layer-major)")
        ax.set_ylabel("writing head (layer-major)")
        ticks = [i * H for i in range(0, L, max(1, L // 8))]
        ax.set_xticks(ticks, [f"L{t // H}" for t in ticks])
        ax.set_yticks(ticks, [f"L{t // H}" for t in ticks])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "composition.png", dpi=100)
    plt.close(fig)


def write(rep: HeadsReport, out: Path, top: int = 10) -> str:
    from safetensors.torch import save_file

    text = tables(rep, top)
    with atomic_directory(out) as tmp:
        p, c = rep.patterns, rep.composition
        save_file(
            {
                "induction": p.induction,
                "duplicate": p.duplicate,
                "previous": p.previous,
                "copying": rep.copying,
                "K": c.K,
                "Q": c.Q,
                "V": c.V,
            },
            str(tmp / "scores.safetensors"),
            metadata={
                "model": rep.name,
                "n": str(p.n),
                "batch": str(p.batch),
                "baseline": f"{c.baseline:.6g}",
            },
        )
        (tmp / "heads.md").write_text(text)
        plot(rep, tmp)
    return text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="clt heads",
        description="Score every attention head of a model: induction, previous-token and duplicate-token "
        "scores from attention on repeated random tokens, copying from OV eigenvalues, and Q/K/V "
        "composition between all head pairs. Writes tables and heatmaps to --out.",
    )
    ap.add_argument("model", help="bundled:smollm2-135m-instruct, a local checkpoint dir or a hub name")
    ap.add_argument("--out", default=None, help="output folder (default: heads-<model name>)")
    ap.add_argument("--n", type=int, default=50, help="length of each random sequence (repeated once)")
    ap.add_argument("--batch", type=int, default=4, help="number of random sequences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=10, help="rows per table")
    ap.add_argument("--offset", type=int, default=0, help="RoPE query-key offset for Q/K-composition")
    ap.add_argument("--family", default="auto", help="model family (default: the config's model_type)")
    args = ap.parse_args(argv)
    for key in ("n", "batch", "top"):
        if getattr(args, key) < 1:
            raise CircuitError(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.offset < 0:
        raise CircuitError(f"--offset must be ≥ 0, got {args.offset}")
    from ..config import ModelConfig
    from ..subject import load_subject

    if (Path(args.model) / "toy_vocab.json").exists():  # a toy.py model with its own ids: no tokenizer
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        cfg = ModelConfig(name_or_path=args.model, dtype="float32", family=args.family)
        model = load_subject(cfg, key="MODEL").model
    slug = args.model.replace("bundled:", "").rstrip("/").split("/")[-1]
    out = Path(args.out or f"heads-{slug}")
    rep = analyse(model, args.model, args.n, args.batch, args.seed, args.offset, args.family)
    print(write(rep, out, args.top))
    print(f"wrote {out}/ (heads.md, scores.safetensors, patterns.png, composition.png)")
    return 0
