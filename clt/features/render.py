"""A feature card as a picture: `python -m clt.features render STORE LAYER FEATURE --out card.png`.

Top: the feature's name and statistics; the activation histogram (with its quantiles); the
top/bottom logit effects; where its decoder writes (norm per target layer). Below: the top
examples and interval samples, each token shaded by the feature's activation, the example's
token outlined.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from .store import FeatureCard

CHARS = 170  # characters per example line (8 pt monospace across the figure)


def _line(ex, vmax: float, width: int = CHARS) -> list[tuple[str, float, bool]]:
    """(text, activation, is the example's token) pieces of one example that fit `width`
    characters, keeping the example's token in view."""
    toks = [t.replace(" ", "\u2009") if t.strip() == "" else t for t in ex.tokens]
    i = ex.train_token_ind
    lo, hi, used = i, i + 1, len(toks[i])
    while True:
        grew = False
        if hi < len(toks) and used + len(toks[hi]) <= width * 0.7 + (width * 0.3 if lo == 0 else 0):
            used, hi, grew = used + len(toks[hi]), hi + 1, True
        if lo > 0 and used + len(toks[lo - 1]) <= width:
            used, lo, grew = used + len(toks[lo - 1]), lo - 1, True
        if not grew:
            break
    return [(toks[j], ex.tokens_acts_list[j] / vmax if vmax > 0 else 0.0, j == i) for j in range(lo, hi)]


def _short(token: str, n: int = 14) -> str:
    r = repr(token)
    return r if len(r) <= n else r[: n - 2] + "…'"


def render_card(
    card: FeatureCard, path: str | os.PathLike, max_examples: int = 8, max_intervals: int = 3
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in card.examples_quantiles if g.examples]
    top = groups[:1]
    intervals = [g for g in groups[1:]][:max_intervals]
    shown = [(g, g.examples[: max_examples if g.quantile_name == "Top" else 3]) for g in top + intervals]
    n_lines = sum(len(ex) + 1 for _, ex in shown)
    fig = plt.figure(figsize=(13, 3.4 + 0.24 * n_lines), dpi=110)
    head = 3.4 / (3.4 + 0.24 * n_lines)
    gs = fig.add_gridspec(
        2,
        3,
        height_ratios=[head, 1 - head],
        width_ratios=[1.25, 1, 0.8],
        hspace=0.25,
        wspace=0.35,
        left=0.05,
        right=0.98,
        top=0.9,
        bottom=0.02,
    )
    status = (
        "DEAD (never fired)"
        if card.dead
        else (
            f"fires on {100 * card.activation_frequency:.3g}% of {card.n_tokens:,} tokens · "
            f"max {card.act_max:.3g} · mean {card.mean_activation:.3g}"
        )
    )
    fig.suptitle(
        f"Layer {card.layer} · feature {card.feature}   —   {status}",
        x=0.05,
        ha="left",
        fontsize=13,
        fontweight="bold",
    )

    ax = fig.add_subplot(gs[0, 0])
    n = len(card.histogram)
    width = card.act_max / n if card.act_max > 0 else 1.0
    ax.bar([(i + 0.5) * width for i in range(n)], card.histogram, width=width * 0.95, color="#f28e2b")
    for q, style in ((49, "--"), (89, ":"), (98, "-.")):
        if card.quantile_values and card.act_max > 0:
            ax.axvline(card.quantile_values[q], color="#555", ls=style, lw=0.8, label=f"p{q + 1}")
    if card.act_max > 0:
        ax.legend(fontsize=7, frameon=False)
    ax.set_title("activation density (non-zero)", fontsize=9)
    ax.set_xlabel("activation", fontsize=8)
    ax.tick_params(labelsize=7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)

    ax = fig.add_subplot(gs[0, 1])
    ax.axis("off")
    ax.set_title("logit effects (decoder over all target layers)", fontsize=9)
    k = min(8, len(card.top_logits))
    for i in range(k):
        ax.text(
            0.0,
            0.92 - i * 0.115,
            _short(card.top_logits[i]),
            color="#1a7f37",
            fontsize=9,
            family="monospace",
            transform=ax.transAxes,
        )
        ax.text(
            0.38,
            0.92 - i * 0.115,
            f"{card.top_logit_values[i]:+.3f}",
            color="#1a7f37",
            fontsize=8,
            transform=ax.transAxes,
        )
        ax.text(
            0.55,
            0.92 - i * 0.115,
            _short(card.bottom_logits[i]),
            color="#cf222e",
            fontsize=9,
            family="monospace",
            transform=ax.transAxes,
        )
        ax.text(
            0.92,
            0.92 - i * 0.115,
            f"{card.bottom_logit_values[i]:+.3f}",
            color="#cf222e",
            fontsize=8,
            transform=ax.transAxes,
        )

    ax = fig.add_subplot(gs[0, 2])
    layers = list(range(card.layer, card.layer + len(card.decoder_norms)))
    ax.bar(layers, card.decoder_norms, color="#4e79a7")
    ax.set_title("decoder norm per target layer", fontsize=9)
    ax.set_xlabel("target layer", fontsize=8)
    cast(Any, ax.xaxis.get_major_locator()).set_params(integer=True)  # (a MaxNLocator)
    ax.tick_params(labelsize=7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)

    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    ax.set_xlim(0, CHARS)
    ax.set_ylim(n_lines + 0.5, -0.5)
    cmap = matplotlib.colormaps["Oranges"]
    y = 0
    for g, examples in shown:
        title = "Top activations (one per document)" if g.quantile_name == "Top" else g.quantile_name
        ax.text(0, y, title, fontsize=9, fontweight="bold", va="center")
        y += 1
        for ex in examples:
            x = 0.0
            for text, rel, peak in _line(ex, card.act_max):
                ax.text(
                    x,
                    y,
                    text,
                    family="monospace",
                    fontsize=8,
                    va="center",
                    bbox={
                        "boxstyle": "square,pad=0.12",
                        "fc": cmap(0.05 + 0.8 * max(0.0, min(rel, 1.0))),
                        "ec": "#111" if peak else "none",
                        "lw": 1.0 if peak else 0,
                    },
                )
                x += max(len(text), 1)
            y += 1
    if not shown:
        ax.text(0, 0, "no examples: the feature never fired in the tokens scanned", fontsize=9, va="center")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
