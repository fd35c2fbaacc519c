"""Attention-only toy transformers (Seed 003, after "A Mathematical Framework for Transformer
Circuits"): GPT-2 blocks (toy.arch=gpt2: learned absolute positions) or Llama blocks (toy.arch=llama:
rotary positions) whose MLPs are zero (width 1, zero weights, frozen), so each block adds only its
attention, trained on text, with their heads scored along the way.

The checkpoint is a plain GPT-2 or Llama (`model/`, with the tokenizer), so every tool reads it: `clt heads
runs/toy-2l/model`, `Heads(model)`, attribution. What a run writes to `toy.out`:

    model/          the trained model and tokenizer
    history.jsonl   per evaluation: step, tokens, train loss, best induction and previous-token
                    scores, next-token loss on the first and second copy of repeated random tokens
    history.png     those curves against tokens seen
    heads/          `clt heads` on the final model (heads.md, scores, heatmaps)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import SPAN_MIN, ToyJobConfig
from ..files import atomic_directory


def build(cfg, vocab_size: int, context: int, bos: int, eos: int) -> Any:
    """`cfg.layers` attention-only blocks: a GPT-2 (learned absolute positions added to the residual)
    or a Llama (rotary positions inside each head's QK form, RMSNorm), per `cfg.arch`. The MLPs add
    exactly zero: width 1, zero weights (GPT-2's c_proj(gelu(0)); Llama's down(silu(gate)·up)), frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    model: Any
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=cfg.d_model,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_inner=1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = GPT2LMHeadModel(config)
        blocks = model.transformer.h
    else:
        lconfig = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=1,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=context,
            tie_word_embeddings=True,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = LlamaForCausalLM(lconfig)
        blocks = model.model.layers
    for block in blocks:
        mlp: torch.nn.Module = block.mlp  # type: ignore[assignment]
        for p in mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def _lr(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def common_tokens(windows, n_windows: int, k: int, vocab: int, special: list[int]) -> torch.Tensor:
    """The k most common ids in the next n_windows training windows, commonest first (special
    tokens left out): the evaluation draws its random tokens from these, whose embeddings the toy
    model has trained; with toy.vocab they are the toy model's whole vocabulary."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for _ in range(n_windows):
        counts += torch.bincount(next(windows)[0].flatten(), minlength=vocab)
    counts[special] = 0
    return counts.argsort(descending=True, stable=True)[: min(k, int((counts > 0).sum()))]


def repeat_span(window: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """window [T] (BOS first) with x[j : j+L] = x[i : i+L] for a random length L in [SPAN_MIN, n/2]
    (n = T − 1 text tokens), source i and copy j ≥ i + L drawn uniformly: the second copy is
    predictable from the first only by looking back to the token after the current one's earlier
    occurrence, at a gap that varies, which is what an induction head does."""
    out, n = window.clone(), window.numel() - 1
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    length = r(SPAN_MIN, n // 2)
    i = r(0, n - 2 * length)
    j = r(i + length, n - length)
    out[1 + j : 1 + j + length] = window[1 + i : 1 + i + length]
    return out


def evaluate(model, cfg, pool: torch.Tensor | None) -> dict:
    from .patterns import head_scores

    model.eval()
    s = head_scores(model, n=cfg.repeat_n, batch=4, seed=1234, pool=pool)
    model.train()
    return {
        "induction": float(s.induction.max()),
        "induction_head": [int(i) for i in divmod(int(s.induction.argmax()), s.induction.shape[1])],
        "previous": float(s.previous.max()),
        "loss_first_copy": s.loss_first,
        "loss_second_copy": s.loss_second,
    }


def plot_history(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = [h["tokens"] / 1e6 for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(tok, [h["induction"] for h in history], label="best induction score")
    a.plot(tok, [h["previous"] for h in history], label="best previous-token score")
    a.set_xlabel("training tokens (millions)")
    a.set_ylim(0, 1)
    a.legend()
    b.plot(tok, [h["loss_first_copy"] for h in history], label="first copy (no context)")
    b.plot(tok, [h["loss_second_copy"] for h in history], label="second copy (in-context)")
    b.plot(tok, [h["train_loss"] for h in history], label="training text", alpha=0.6)
    b.set_xlabel("training tokens (millions)")
    b.set_ylabel("next-token loss (nats)")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_toy(job: ToyJobConfig, progress: bool = True) -> Path:
    from transformers import AutoTokenizer

    from ..data.text import TextPosition, WindowStream
    from ..subject import _bundled_dir
    from .report import analyse, write

    cfg, data = job.toy, job.data
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    name = job.model.name_or_path
    path = _bundled_dir(name, job.model) if name.startswith("bundled:") else name
    tok = AutoTokenizer.from_pretrained(path)
    stream = WindowStream(data, tok)
    windows = stream.windows(TextPosition())
    special = sorted({stream.bos, stream.sep, *tok.all_special_ids})
    common = common_tokens(
        stream.windows(TextPosition()), 2000, max(cfg.vocab, cfg.eval_vocab), len(tok), special
    )
    lut = None  # tokenizer id -> toy id, with toy.vocab
    if cfg.vocab:  # the BOS/EOS, the commonest tokens, then one id for every other token
        ends = list(dict.fromkeys([stream.bos, stream.sep]))
        kept = torch.tensor(ends + common[: cfg.vocab - 1 - len(ends)].tolist())
        lut = torch.full((len(tok),), cfg.vocab - 1, dtype=torch.long)
        lut[kept] = torch.arange(len(kept))
    ids = (lambda x: x) if lut is None else (lambda x: lut[x])
    vocab = len(tok) if lut is None else cfg.vocab
    model = build(
        cfg, vocab, data.context_size, int(ids(torch.tensor(stream.bos))), int(ids(torch.tensor(stream.sep)))
    )
    model = model.to(device).train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    pool = ids(common[: cfg.eval_vocab]) if cfg.eval_vocab else None
    history: list[dict] = []
    out = Path(cfg.out)
    tokens, t0, loss_avg = 0, time.perf_counter(), None
    gen = torch.Generator().manual_seed(cfg.seed)

    def window() -> torch.Tensor:
        w = next(windows)[0]
        return repeat_span(w, gen) if float(torch.rand((), generator=gen)) < cfg.repeat_spans else w

    bar = tqdm(range(cfg.steps), desc=f"toy {cfg.layers}-layer", unit="step", disable=not progress)
    for step in bar:
        batch = ids(torch.stack([window() for _ in range(data.batch_windows)])).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += batch.numel()
        loss_avg = float(loss) if loss_avg is None else 0.95 * loss_avg + 0.05 * float(loss)
        last = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            h = {
                "step": step + 1,
                "tokens": tokens,
                "train_loss": loss_avg,
                "seconds": round(time.perf_counter() - t0, 1),
                **evaluate(model, cfg, pool),
            }
            history.append(h)
            bar.set_postfix(loss=f"{loss_avg:.2f}", ind=f"{h['induction']:.3f}", prev=f"{h['previous']:.2f}")
    model.eval()
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp / "model")
        if lut is None:
            tok.save_pretrained(tmp / "model")
        else:  # its own ids: toy id i is tokenizer id vocab[i] (the last: every other token)
            (tmp / "model" / "toy_vocab.json").write_text(json.dumps(kept.tolist() + [-1]))
        if pool is not None:
            (tmp / "eval_ids.json").write_text(json.dumps(pool.tolist()))  # the model's ids
        (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_history(history, tmp / "history.png", f"{cfg.layers}-layer attention-only, d={cfg.d_model}")
    rep = analyse(model, f"{cfg.layers}-layer attention-only toy", n=cfg.repeat_n, pool=pool)
    print(write(rep, out / "heads"))
    return out
