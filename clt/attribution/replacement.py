"""The local replacement model (docs/DESIGN.md §6) on a plain Hugging Face causal LM.

A clean forward pass of the subject model on the prompt records every attention pattern and
every norm denominator. Replaying them makes the model affine in the residual stream; replacing
every MLP output by the CLT's reconstruction plus an error term (the clean MLP output minus the
reconstruction) then gives the *frozen replacement model*, an affine function of

    E    : [T, d]       token embeddings (the input of the first layer, before any scaling)
    a    : [T, L, F]    feature activations (position 0, the BOS token, zeroed)
    err  : [T, L, d]    error vectors (position 0 zeroed; its MLP output stays a constant)

whose outputs are the CLT pre-activations h: [T, L, F] and the pre-softcap logits [T, V]. With
the clean sources it reproduces the subject model's outputs exactly; attribution edges are its
linear coefficients. The *live* replacement model (`forward`) runs the subject normally with
the MLPs replaced by the CLT (closed loop) or patched by feature interventions.

Nothing here knows a model family beyond `Subject`'s hook points: attention patterns are frozen
through a registered transformers attention function, norms by patching every RMSNorm/LayerNorm.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import norms
from ..errors import AttributionError  # noqa: F401 (re-exported)
from ..model import CrossLayerTranscoder
from ..subject import Subject

ATTN_IMPL = "clt_replacement"


# ---------------------------------------------------------------------------------------------
# Freezing attention patterns and norm denominators


# Attention is replayed from what the clean run saw (queries, keys, values, mask) rather than from
# stored [H, T, T] patterns: pattern rows are recomputed by the model's own eager attention on blocks
# of at most ATTENTION_BLOCK elements (heads × query rows × keys), in the forward and again in the
# backward, so memory grows linearly with the prompt (the clean run's attention too).
ATTENTION_BLOCK = 1 << 24


@dataclass
class RecordedAttention:
    """One attention module's clean-run inputs. query: [1, H, T, D], key/value: [1, H_kv, S, D]
    (after any rotary or q/k norm), mask: [1 or B, 1, T, S] bool (True = attend) or None; kwargs:
    the module's scaling, softcap, sliding window... as passed to its attention function."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    mask_dtype: torch.dtype
    kwargs: dict

    @property
    def shape(self) -> tuple[int, int, int]:  # (H, T, S)
        return self.query.shape[1], self.query.shape[2], self.key.shape[2]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Pattern rows of queries lo..hi−1, exactly as the model computes them: [H, hi − lo, S]."""
        return _eager(
            self.module,
            self.query[:, :, lo:hi],
            self.key,
            self.value,
            _mask_rows(self.mask, lo, hi, self.mask_dtype),
            self.kwargs,
        )[1][0]

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        H, T, S = self.shape
        step = max(1, ATTENTION_BLOCK // max(H * S, 1))
        for lo in range(0, T, step):
            hi = min(lo + step, T)
            yield lo, hi, self.rows(lo, hi)

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        """The frozen attention output for any values. value: [B, H_kv, S, D] -> [B, T, H, D].
        out[b, t, h] = Σ_s w[h, t, s] · value[b, h // n_rep, s]: one matmul per kv head with the
        batch folded into the columns (the pattern is never expanded over the batch)."""
        B, H_kv, S, D = value.shape
        H, T, _ = self.shape
        v = value.permute(1, 2, 0, 3).reshape(H_kv, S, B * D)
        out = value.new_empty(B, T, H, D)
        for lo, hi, w in self.blocks():
            o = torch.matmul(w.to(value.dtype).reshape(H_kv, (H // H_kv) * (hi - lo), S), v)
            out[:, lo:hi] = o.reshape(H, hi - lo, B, D).permute(2, 1, 0, 3)
        return out

    def apply_transposed(self, g: torch.Tensor) -> torch.Tensor:
        """The adjoint of `apply`: g: [B, T, H, D] -> [B, H_kv, S, D]."""
        B, T, H, D = g.shape
        H_kv, S = self.key.shape[1], self.key.shape[2]
        gv = g.new_zeros(H_kv, S, B * D)
        for lo, hi, w in self.blocks():
            gb = g[:, lo:hi].permute(2, 1, 0, 3).reshape(H_kv, (H // H_kv) * (hi - lo), B * D)
            gv += torch.matmul(w.to(g.dtype).reshape(H_kv, -1, S).transpose(1, 2), gb)
        return gv.reshape(H_kv, S, B, D).permute(2, 0, 1, 3)


class _FrozenAttention(torch.autograd.Function):
    """value -> frozen pattern @ value, the pattern recomputed by blocks (never saved)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(ctx, value: torch.Tensor, rec: RecordedAttention) -> torch.Tensor:  # type: ignore[override]
        ctx.rec = rec
        return rec.apply(value)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return ctx.rec.apply_transposed(g.contiguous()), None

    @staticmethod
    def jvp(ctx, dv: torch.Tensor, _) -> torch.Tensor:  # type: ignore[override]
        return ctx.rec.apply(dv)  # linear in the values (forward-mode: head loadings)


@dataclass
class Freeze:
    """What a clean run recorded, and how the next runs use it.

    attention / norms: "off" (normal), "record" (normal, and remember), "replay" (use what was
    remembered: each attention module's inputs, norm scales [1, T, 1], broadcast over any batch)."""

    attention: str = "off"
    norms: str = "off"
    attn: dict[int, RecordedAttention] = field(default_factory=dict)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # a masked LM head's act(z) / z

    def pattern(self, module: nn.Module, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """The clean attention pattern of `module`, query rows lo..hi−1: [H, n, S] (O(H·n·S))."""
        rec = self.attn[id(module)]
        return rec.rows(lo, rec.shape[1] if hi is None else hi)


def _frozen_activation_forward(module: nn.Module, original):
    """forward(z) for the activation of a masked LM's prediction head (BERT: GELU between the
    residual stream and the logits): recorded as the gate act(z) / z of the clean run and replayed
    as z · gate, so the frozen model stays affine and equals the model at the clean sources."""
    key = id(module)

    def forward(z: torch.Tensor) -> torch.Tensor:
        fz = _ACTIVE[-1]
        if fz.norms == "off":
            return original(z)
        if fz.norms == "record":
            out = original(z)
            zf = z.float()
            gate = torch.where(zf.abs() > 1e-6, out.float() / zf.where(zf.abs() > 1e-6, 1.0), 0.5)
            fz.gates[key] = gate.detach()
            return out
        return (z.float() * fz.gates[key]).to(z.dtype)

    return forward


_ACTIVE: list[Freeze] = [Freeze()]  # the innermost `ReplacementModel._freezing` context


def _eager(module, query, key, value, mask, kwargs):
    return sys.modules[type(module).__module__].eager_attention_forward(
        module, query, key, value, mask, **kwargs
    )


def _mask_rows(mask: torch.Tensor | None, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Rows lo..hi−1 of a bool mask as the additive mask eager attention adds (0 / dtype's min)."""
    if mask is None:
        return None
    m = mask[:, :, lo:hi] if mask.shape[2] > 1 else mask
    return torch.where(m, torch.zeros((), device=m.device, dtype=dtype), torch.finfo(dtype).min)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function: the model's own eager attention, by blocks of queries,
    recorded or replayed. query: [B, H, T, D], key/value: [B, H_kv, S, D] -> ([B, T, H, D], None).
    attention_mask: what `_mask` made (bool [B, 1, T, S], True = attend) or None."""
    fz = _ACTIVE[-1]
    if fz.attention == "replay":
        return _FrozenAttention.apply(value, fz.attn[id(module)]), None
    mask, dtype = attention_mask, query.dtype  # eager_mask's dtype is the model's, the queries' one
    rec = RecordedAttention(module, query, key, value, mask, dtype, kwargs)
    out = torch.cat(
        [
            _eager(module, query[:, :, lo:hi], key, value, _mask_rows(mask, lo, hi, dtype), kwargs)[0]
            for lo, hi in _query_blocks(rec)
        ],
        1,
    )
    if fz.attention == "record":
        fz.attn[id(module)] = RecordedAttention(
            module, query.detach(), key.detach(), value.detach(), mask, dtype, kwargs
        )
    return out, None


def _query_blocks(rec: RecordedAttention) -> list[tuple[int, int]]:
    B, H, T, _ = rec.query.shape
    step = max(1, ATTENTION_BLOCK // max(B * H * rec.key.shape[2], 1))
    return [(lo, min(lo + step, T)) for lo in range(0, T, step)]


def _mask(*args, **kwargs):
    """The mask function of ATTN_IMPL: sdpa's bool mask (eager attention's additive float mask is
    made per block of queries); nothing in replay (the recorded one is used)."""
    from transformers.masking_utils import sdpa_mask

    if _ACTIVE[-1].attention == "replay":
        return None
    kwargs.pop("dtype", None)
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPL, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, _mask)


def _frozen_norm_forward(module: nn.Module, affine: tuple, original):
    """forward(x) for a norm whose denominator can be recorded and replayed. `affine` is the
    module's (gain, bias, centred, eps) from clt.norms; in record mode the output is the module's
    own, and that affine form is checked against it on the live input (an unknown norm variant
    fails loudly instead of giving wrong edges)."""
    gain, _, centred, eps = affine
    w = getattr(module, "weight", None)
    plus_one = w is not None and not torch.equal(gain, w.detach().float())  # Gemma's 1 + w
    key = id(module)

    def apply(z: torch.Tensor) -> torch.Tensor:  # the live weights (they may move or change later)
        if w is not None:
            z = z * ((1.0 + w.float()) if plus_one else w.float())
        b = getattr(module, "bias", None)
        return z + b.float() if b is not None else z

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fz = _ACTIVE[-1]
        if fz.norms == "off":
            return original(x, *args, **kwargs)
        xf = x.float()
        z = xf - xf.mean(-1, keepdim=True) if centred else xf
        if fz.norms == "record":
            out = original(x, *args, **kwargs)
            scale = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
            fz.scales[key] = scale.detach()
            err = (apply(z * scale) - out.float()).abs().max().item()
            if err > norms.deviation_tolerance(out, x.dtype):
                raise AttributionError(
                    f"cannot freeze {type(module).__name__}: it is not a plain RMSNorm/LayerNorm "
                    f"(max deviation {err:.3g}); this model family is not supported by attribution"
                )
            return out
        return apply(z * fz.scales[key]).to(x.dtype)

    return forward


# ---------------------------------------------------------------------------------------------
# Interventions


@dataclass
class Intervention:
    """Set (or scale) feature `feature` of source layer `layer` at `position` (an int, a list,
    or a slice; `slice(k, None)` also covers generated tokens)."""

    layer: int
    position: int | slice | Sequence[int]
    feature: int
    value: float
    mode: str = "set"  # "set": a = value; "scale": a = value · a


def _as_interventions(items) -> list[Intervention]:
    out = []
    for it in items or ():
        it = it if isinstance(it, Intervention) else Intervention(*it)
        if it.mode not in ("set", "scale"):
            raise AttributionError(f"intervention mode must be 'set' or 'scale', got {it.mode!r}")
        out.append(it)
    return out


def _positions(pos, offset: int, n: int) -> list[int]:
    """Local indices in [0, n) of the absolute positions `pos` among offset..offset+n-1."""
    if isinstance(pos, slice):
        start, stop, step = pos.start or 0, pos.stop, pos.step or 1
        return [
            p - offset
            for p in range(max(start, offset), offset + n if stop is None else min(stop, offset + n))
            if (p - start) % step == 0
        ]
    plist = [pos] if isinstance(pos, int) else list(pos)
    return [p - offset for p in plist if offset <= p < offset + n]


def _edit(a: torch.Tensor, interventions: list[Intervention], offset: int) -> None:
    """In place. a: [..., n, F] activations of one layer at positions offset..offset+n-1."""
    for it in interventions:
        if not 0 <= it.feature < a.shape[-1]:
            raise AttributionError(
                f"intervention on feature {it.feature}: the CLT has {a.shape[-1]} features"
            )
        idx = _positions(it.position, offset, a.shape[-2])
        if idx:
            cur = a[..., idx, it.feature]
            a[..., idx, it.feature] = cur * it.value if it.mode == "scale" else torch.full_like(cur, it.value)


def apply_interventions(a: torch.Tensor, interventions: list[Intervention], offset: int = 0) -> torch.Tensor:
    """a: [T, L, F] activations of positions offset..offset+T-1 -> a copy with the interventions."""
    a = a.clone()
    for it in interventions:
        if not 0 <= it.layer < a.shape[1]:
            raise AttributionError(f"intervention on layer {it.layer}: the CLT has {a.shape[1]} layers")
        _edit(a[:, it.layer], [it], offset)
    return a


# ---------------------------------------------------------------------------------------------
# The replacement model


@dataclass
class PromptContext:
    """Everything the clean run of one prompt leaves behind. Layouts follow the CLT's [T, L, ·]."""

    ids: torch.Tensor  # [T] token ids (BOS first)
    E: torch.Tensor  # [T, d] token embeddings
    h: torch.Tensor  # [T, L, F] CLT pre-activations
    a: torch.Tensor  # [T, L, F] CLT activations, position 0 zeroed
    err: torch.Tensor  # [T, L, d] error nodes: MLP output − reconstruction, position 0 zeroed
    bos_out: torch.Tensor  # [T, L, d] the rest of the clean MLP output at position 0 (a constant)
    y: torch.Tensor  # [T, L, d] clean MLP outputs
    logits: torch.Tensor  # [T, V] the subject model's logits (after any softcap)
    logits_pre: torch.Tensor  # [T, V] the same before the softcap (= logits without one)
    freeze: Freeze  # recorded attention patterns and norm scales
    target: int = -1  # the position whose logits are attributed: the last, or a masked LM's [MASK]


class ReplacementModel:
    """A subject model and a CLT trained on it: clean runs, the frozen (linear) replacement model,
    the live replacement model and feature interventions."""

    def __init__(self, subject: Subject, clt: CrossLayerTranscoder):
        arch = clt.arch
        if (arch.n_layers, arch.d_model) != (subject.n_layers, subject.d_model):
            raise AttributionError(
                f"the CLT was trained for a model with {arch.n_layers} layers and d_model={arch.d_model} "
                f"({arch.subject_model or 'unknown model'}), but {subject.name or 'the subject model'} has "
                f"{subject.n_layers} layers and d_model={subject.d_model}: wrong checkpoint for this model?"
            )
        for side, mine, theirs in (
            ("input", arch.input_hook, subject.input_hook),
            ("output", arch.output_hook, subject.output_hook),
        ):
            if mine != theirs:
                raise AttributionError(
                    f"the CLT reads/writes {side} hook {mine!r}; the subject is set up with {theirs!r}"
                )
        self.subject, self.clt = subject, clt.eval()
        self.model: Any = subject.model  # the transformers model
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.unembed = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.n_layers, self.d_model, self.d_sae = arch.n_layers, arch.d_model, arch.d_sae
        # the MLPs whose outputs the frozen runs replace (skipped; BERT's hook sits inside its block)
        self.masked_lm = subject.masked_lm
        self.mlps = (
            []
            if self.masked_lm
            else [subject.hook_module(layer, "mlp_in")[0] for layer in range(self.n_layers)]
        )
        # a masked LM's prediction head before the unembedding (BERT: dense, GELU, LayerNorm); its
        # LayerNorm is frozen with the others, its activation by `_frozen_activation_forward`
        self.head = self.model.cls.predictions.transform if self.masked_lm else None
        self.norms = [  # every norm with its affine form (gain, bias, centred, eps)
            (m, norms.norm_affine(m, AttributionError))
            for m in self.model.modules()
            if norms.norm_kind(m) is not None
        ]
        _register_attention()

    # -- small pieces ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.subject.device

    @property
    def n_ctx(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def tokenize(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A prompt -> ids [T] starting with BOS (added when missing). Empty or too long: an error."""
        tok = self.subject.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise AttributionError("the prompt is empty")
            if tok is None:
                raise AttributionError("a text prompt needs the subject's tokenizer; pass token ids instead")
            ids = tok(prompt, add_special_tokens=self.masked_lm)["input_ids"]  # BERT: [CLS] … [SEP]
        else:
            ids = torch.as_tensor(prompt).flatten().tolist()
            if not ids:
                raise AttributionError("the prompt is empty")
        bos = None
        if tok is not None:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if self.masked_lm:
                bos = tok.cls_token_id
        if bos is None:
            bos = getattr(self.model.config, "bos_token_id", None)
        if bos is not None and ids[0] != bos:
            ids = [bos, *ids]
        if len(ids) < 2:
            raise AttributionError("the prompt is empty (only a BOS token)")
        if self.n_ctx is not None and len(ids) > self.n_ctx:
            raise AttributionError(
                f"the prompt has {len(ids)} tokens (BOS included) but the model's context "
                f"is {self.n_ctx} tokens"
            )
        return torch.tensor(ids, dtype=torch.long)

    def target_position(self, ids: torch.Tensor) -> int:
        """The position attributed: the last, or for a masked LM its one [MASK] token."""
        if not self.masked_lm:
            return len(ids) - 1
        tok = self.subject.tokenizer
        mask = getattr(tok, "mask_token_id", None)
        where = (ids == mask).nonzero().flatten().tolist() if mask is not None else []
        if len(where) != 1:
            raise AttributionError(
                f"a masked-LM prompt needs exactly one {getattr(tok, 'mask_token', '[MASK]')} token, the "
                f"position attributed; this one has {len(where)}"
            )
        return int(where[0])

    def final_hidden(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The base model's output -> what the unembedding reads (a masked LM: after its head)."""
        return last_hidden_state if self.head is None else self.head(last_hidden_state)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def logits_pre_softcap(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (after the final norm): [..., d] -> logits before any softcap: [..., V]."""
        return self.unembed(hidden)

    def softcapped(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            return torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logit_vectors(self, vocab_ids: torch.Tensor) -> torch.Tensor:
        """Demeaned unembedding rows: d(logit_v − mean logit)/d hidden. [K] -> [K, d]."""
        W = self.unembed.weight
        return (W[vocab_ids] - W.mean(0)).float()

    @contextlib.contextmanager
    def _freezing(self, freeze: Freeze, stub_mlps: bool = False) -> Iterator[None]:
        cfg = self.model.config
        old_impl = cfg._attn_implementation
        patched = []
        try:
            cfg._attn_implementation = ATTN_IMPL
            for m, affine in self.norms:
                patched.append((m, m.__dict__.get("forward")))
                m.forward = _frozen_norm_forward(m, affine, type(m).forward.__get__(m))
            if self.head is not None:
                act = self.head.transform_act_fn
                patched.append((act, act.__dict__.get("forward")))
                act.forward = _frozen_activation_forward(act, type(act).forward.__get__(act))
            if stub_mlps:  # their outputs are replaced: skip the work (hooks on them still fire)
                for m in self.mlps:
                    patched.append((m, m.__dict__.get("forward")))
                    m.forward = lambda x, *a, **k: torch.zeros_like(x)
            _ACTIVE.append(freeze)
            yield
        finally:
            _ACTIVE.pop()
            for m, fwd in reversed(patched):
                if fwd is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = fwd
            cfg._attn_implementation = old_impl

    # -- the clean run ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, prompt) -> PromptContext:
        """Run the subject model on the prompt; record patterns and norm scales; encode with the CLT."""
        ids = self.tokenize(prompt).to(self.device)
        freeze = Freeze(attention="record", norms="record")
        L, sub = self.n_layers, self.subject
        xs: list = [None] * L
        ys: list = [None] * L

        def read(layer, x):
            xs[layer] = x[0].float()

        def write(layer, y):
            ys[layer] = y[0].float()

        E = self.embed(ids)[None]  # [1, T, d]
        with self._freezing(freeze), sub.hooks({sub.input_hook: read, sub.output_hook: write}):
            hidden = self.final_hidden(self.base(inputs_embeds=E, use_cache=False).last_hidden_state)
        freeze.attention = freeze.norms = "replay"
        logits_pre = self.logits_pre_softcap(hidden[0]).float()
        x, y = torch.stack(xs, 1), torch.stack(ys, 1)  # [T, L, d]
        h = self.clt.encode(x)
        a = self.clt.activate(h)
        a[0] = 0
        recon = self.clt.decode(a)
        err = y - recon
        bos_out = torch.zeros_like(err)
        bos_out[0] = err[0]
        err[0] = 0
        return PromptContext(
            ids=ids,
            E=E[0].float(),
            h=h,
            a=a,
            err=err,
            bos_out=bos_out,
            y=y,
            logits=self.softcapped(logits_pre),
            logits_pre=logits_pre,
            freeze=freeze,
            target=self.target_position(ids),
        )

    # -- the frozen replacement model ------------------------------------------------------------
    def mlp_outputs(
        self, ctx: PromptContext, a: torch.Tensor | None = None, err: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MLP outputs of the frozen model: decode(a) + err + the BOS constant. [..., T, L, d]."""
        a = ctx.a if a is None else a
        err = ctx.err if err is None else err
        lead = a.shape[:-3]
        dec = self.clt.decode(a.reshape(-1, *a.shape[-2:])).reshape(*lead, *a.shape[-3:-1], -1)
        return dec + err + ctx.bos_out

    def frozen_run(
        self, ctx: PromptContext, E: torch.Tensor, mlp_out: torch.Tensor, on_output=None, on_input=None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen model. E: [B, T, d], mlp_out: [B or 1, T, L, d] ->
        (xs: L × [B, T, d] CLT inputs, hidden: [B, T, d] after the final norm).
        `on_output(layer, tensor)` may return a replacement for layer's MLP output (for gradients);
        `on_input(layer, x)`, what xs holds for layer instead of its CLT input."""
        L, sub = self.n_layers, self.subject
        xs: list = [None] * L
        B = E.shape[0]
        dtype = self.subject.dtype

        def read(layer, x):
            xs[layer] = x if on_input is None else on_input(layer, x)

        def write(layer, y):
            out = mlp_out[:, :, layer].to(dtype).expand(B, -1, -1)
            if on_output is not None:
                out = on_output(layer, out)
            return out

        with (
            self._freezing(ctx.freeze, stub_mlps=True),
            sub.hooks({sub.input_hook: read, sub.output_hook: write}),
        ):
            hidden = self.final_hidden(
                self.base(inputs_embeds=E.to(dtype), use_cache=False).last_hidden_state
            )
        return xs, hidden

    def preactivations(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """xs: L × [B, T, d] -> h: [B, T, L, F]."""
        x = torch.stack(xs, 2)
        return self.clt.encode(x.reshape(-1, *x.shape[2:])).reshape(*x.shape[:3], -1)

    @torch.no_grad()
    def frozen_forward(
        self,
        ctx: PromptContext,
        E: torch.Tensor | None = None,
        a: torch.Tensor | None = None,
        err: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen replacement model as a function of its sources (defaults: the clean ones).
        E: [T, d], a: [T, L, F], err: [T, L, d] -> (h: [T, L, F] pre-activations,
        logits: [T, V] before any softcap)."""
        E = ctx.E if E is None else E
        xs, hidden = self.frozen_run(ctx, E[None], self.mlp_outputs(ctx, a, err)[None])
        return self.preactivations(xs)[0].float(), self.logits_pre_softcap(hidden[0]).float()

    # -- the live replacement model and interventions -------------------------------------------
    @contextlib.contextmanager
    def _live_hooks(self, interventions: list[Intervention], errors: bool, state: dict) -> Iterator[None]:
        """Hooks for a live forward pass. errors=True: the real MLP output plus the change the
        interventions make to the CLT's output (no intervention: the exact subject model).
        errors=False: the MLP output at positions ≥ 1 replaced by the CLT's (closed loop)."""
        clt, sub = self.clt, self.subject
        acts: list = [None] * self.n_layers
        live: list = [None] * self.n_layers

        def read(layer, x):  # x: [B, n, d]
            B, n, d = x.shape
            a = clt.encode_layer(x.reshape(-1, d).float(), layer).view(B, n, -1)
            live[layer] = a
            mine = [i for i in interventions if i.layer == layer]
            if mine:
                a = a.clone()
                _edit(a, mine, state["offset"])
            acts[layer] = a

        def write(layer, y):  # y: [B, n, d]
            B, n, d = y.shape
            flat = [t.reshape(B * n, -1) for t in acts[: layer + 1]]
            if errors:
                if not interventions:
                    return None
                delta = [f - lv.reshape(B * n, -1) for f, lv in zip(flat, live[: layer + 1])]
                change = clt.decode_layer(delta, layer) - clt.b_dec[layer] / clt.output_scale[layer]
                return y + change.view(B, n, d).to(y.dtype)
            out = y.clone()
            recon = clt.decode_layer(flat, layer).view(B, n, d).to(y.dtype)
            start = 1 if state["offset"] == 0 else 0  # position 0 (BOS) keeps its MLP output
            out[:, start:] = recon[:, start:]
            return out

        with sub.hooks({sub.input_hook: read, sub.output_hook: write}):
            yield

    @torch.no_grad()
    def forward(
        self,
        prompt,
        interventions=(),
        errors: bool = True,
        freeze_attention: bool = False,
        ctx: PromptContext | None = None,
    ) -> torch.Tensor:
        """The live replacement model on a prompt -> logits [T, V] (after any softcap).

        errors=True (free-mode interventions): effects propagate through the real model; without
        interventions this is exactly the subject model. errors=False: every MLP output (after BOS)
        is the CLT's, features re-encoded from the live residual stream (the spliced model of
        `clt.metrics.spliced_eval`). freeze_attention: replay the clean run's attention patterns."""
        ivs = _as_interventions(interventions)
        ids = ctx.ids if ctx is not None else self.tokenize(prompt).to(self.device)
        state = {"offset": 0}
        freeze = Freeze()
        if freeze_attention:
            ctx = ctx or self.prepare(ids)
            freeze = Freeze(attention="replay", attn=ctx.freeze.attn)
        with self._freezing(freeze), self._live_hooks(ivs, errors, state):
            logits = self.model(input_ids=ids[None], use_cache=False).logits[0]
        return logits.float()

    @torch.no_grad()
    def intervene(
        self,
        prompt,
        interventions,
        mode: str = "free",
        ctx: PromptContext | None = None,
        freeze_attention: bool = False,
    ) -> torch.Tensor:
        """Logits [T, V] with feature activations set or scaled.

        mode="constrained": the frozen replacement model; only direct effects (other features keep
        their clean activations, attention and norms frozen). mode="free": the live model; effects
        propagate through later layers (see `forward`)."""
        ivs = _as_interventions(interventions)
        if mode == "free":
            return self.forward(prompt, ivs, errors=True, freeze_attention=freeze_attention, ctx=ctx)
        if mode != "constrained":
            raise AttributionError(f"intervention mode must be 'free' or 'constrained', got {mode!r}")
        ctx = ctx or self.prepare(prompt)
        _, logits = self.frozen_forward(ctx, a=apply_interventions(ctx.a, ivs))
        return self.softcapped(logits)

    @torch.no_grad()
    def generate(
        self, prompt, interventions=(), max_new_tokens: int = 20, temperature: float = 0.0, seed: int = 0
    ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Generate with the interventions held (free mode; `slice(k, None)` positions also apply
        to generated tokens). Greedy for temperature 0. -> (new text, all ids [T'], logits [n, V])."""
        ivs = _as_interventions(interventions)
        ids = self.tokenize(prompt).to(self.device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        state = {"offset": 0}
        past, cur, steps = None, ids[None], []
        with self._live_hooks(ivs, True, state):
            for _ in range(max_new_tokens):
                out = self.model(input_ids=cur, past_key_values=past, use_cache=True)
                past = out.past_key_values
                state["offset"] += cur.shape[1]
                logits = out.logits[0, -1].float()
                steps.append(logits)
                if temperature > 0:
                    probs = torch.softmax(logits.cpu() / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen).to(self.device)
                else:
                    nxt = logits.argmax()[None]
                ids = torch.cat([ids, nxt])
                cur = nxt[None]
                eos = getattr(self.subject.tokenizer, "eos_token_id", None)
                if eos is not None and int(nxt) == eos:
                    break
        n_prompt = len(ids) - len(steps)
        text = self.subject.tokenizer.decode(ids[n_prompt:]) if self.subject.tokenizer is not None else ""
        return text, ids, torch.stack(steps)
