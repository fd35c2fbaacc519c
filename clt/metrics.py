"""Evaluation: per-layer FVU and L0, dead features, and the replacement model (the CLT spliced into
every MLP of the subject model): clean CE, spliced CE and KL, CE-loss score against zero-ablation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CrossLayerTranscoder
from .sparsity import SparseActivations, TopKActivations
from .subject import Subject


def fvu_per_layer(sse: torch.Tensor, sst: torch.Tensor) -> torch.Tensor:
    """[L] fraction of variance unexplained per layer."""
    return sse / sst.clamp_min(1e-12)


def l0_per_layer(a: torch.Tensor | TopKActivations | SparseActivations) -> torch.Tensor:
    """a: [N, L, F] or its entries -> [L] mean number of active features per token."""
    if isinstance(a, TopKActivations | SparseActivations):
        return a.l0()
    return (a != 0).sum(-1).float().mean(0)


def fired(a: torch.Tensor | TopKActivations | SparseActivations) -> torch.Tensor:
    """a: [N, L, F] or its entries -> [L, F] bool: active at some token."""
    if isinstance(a, TopKActivations | SparseActivations):
        return a.fired()
    return (a != 0).any(0)


@torch.no_grad()
def reconstruction_stats(
    clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, batch_tokens: int = 1024
) -> dict[str, torch.Tensor]:
    """FVU and L0 per layer of `clt` (in its current mode) on activations x, y: [N, L, d]."""
    sse = torch.zeros(clt.n_layers)
    l0 = torch.zeros(clt.n_layers)
    ys = []
    for i in range(0, x.shape[0], batch_tokens):
        xb, yb = x[i : i + batch_tokens].float(), y[i : i + batch_tokens].float()
        a, y_hat = clt(xb)
        scale = clt.output_scale[:, None].cpu()
        sse += ((y_hat.cpu() - yb) * scale).pow(2).sum(-1).sum(0)
        l0 += (a != 0).sum(-1).float().sum(0).cpu()
        ys.append(yb * scale)
    y_all = torch.cat(ys)
    n = x.shape[0]
    sst = (y_all - y_all.mean(0)).pow(2).sum(-1).mean(0)
    return {"fvu": fvu_per_layer(sse / n, sst), "l0": l0 / n}


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits: [B, T, V], ids: [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def spliced_logits(
    subject: Subject, clt: CrossLayerTranscoder, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] of the clean model, the replacement model and the zero-ablated model.

    Every MLP output (positions after BOS; the CLT is not trained on BOS) is replaced by the CLT's
    output. The CLT reads the replacement model's own residual stream as the forward pass goes
    (closed loop), as in attribution. Zero-ablation sets the same MLP outputs to zero."""
    ids = windows.to(subject.device)
    if subject.masked_lm:  # BERT: the masked windows it reads in training (`Subject.mask`)
        ids = subject.mask(ids)[0]
    was_training = clt.training
    clt.eval()
    clean = subject.model(input_ids=ids, use_cache=False).logits

    acts: list[torch.Tensor] = []

    def read(layer, x):  # x: [B, T, d]
        if layer == 0:
            acts.clear()
        b, t, d = x.shape
        acts.append(clt.encode_layer(x[:, 1:].reshape(-1, d).float(), layer))

    def write(layer, y):  # y: [B, T, d]
        out = y.clone()
        b, t, d = y.shape
        out[:, 1:] = clt.decode_layer(acts, layer).view(b, t - 1, d).to(y.dtype)
        return out

    def zero(layer, y):
        out = y.clone()
        out[:, 1:] = 0
        return out

    with subject.hooks({subject.input_hook: read, subject.output_hook: write}):
        spliced = subject.model(input_ids=ids, use_cache=False).logits
    with subject.hooks({subject.output_hook: zero}):
        ablated = subject.model(input_ids=ids, use_cache=False).logits
    clt.train(was_training)
    return clean, spliced, ablated


@torch.no_grad()
def spliced_eval(subject: Subject, clt: CrossLayerTranscoder, windows: torch.Tensor) -> dict[str, float]:
    """CE and KL of the replacement model on windows [B, T] (see `spliced_logits`): next-token CE,
    or for a masked LM (BERT) the CE of the original tokens at the masked positions."""
    ids = windows.to(subject.device)
    clean, spliced, ablated = spliced_logits(subject, clt, ids)
    if subject.masked_lm:
        chosen = subject.mask(ids)[1]
        ce = lambda z: F.cross_entropy(z[chosen].float(), ids[chosen])  # noqa: E731
        at = chosen
    else:
        ce = lambda z: _ce(z, ids)  # noqa: E731
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, 1:] = True
    ce_clean, ce_spliced, ce_zero = ce(clean), ce(spliced), ce(ablated)
    logp, logq = clean[at].float().log_softmax(-1), spliced[at].float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    score = (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    return {
        "eval/ce_loss_clean": ce_clean.item(),
        "eval/ce_loss_spliced": ce_spliced.item(),
        "eval/kl_spliced": kl.item(),
        "eval/ce_loss_zero_ablation": ce_zero.item(),
        "eval/ce_loss_score": score.item(),
    }
