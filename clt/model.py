"""The cross-layer transcoder (docs/DESIGN.md §1).

    x̃_l = s_in[l] · x_l                                       normalised input,  x: [N, L, d]
    h_l = W_enc[l] x̃_l + b_enc[l]                            pre-activations,   h: [N, L, F]
    a_l = σ(h_l)                                              activations,       a: [N, L, F]
    ỹ̂_l = Σ_{s ≤ l} W_dec[s][:, l − s]ᵀ a_s + b_dec[l]       normalised output
    ŷ_l = ỹ̂_l / s_out[l]                                      output,            ŷ: [N, L, d]

The module works in the subject model's units; the normalisation scalars s_in, s_out are buffers
(one per layer) and `folded()` moves them into the weights. Decoders are source-major:
W_dec[s]: [F, L − s, d], so one active feature's rows for all later layers are contiguous.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import kernels
from . import sparsity as act
from .errors import CheckpointError  # noqa: F401 (re-exported)
from .kernels.jumprelu import jumprelu_encode
from .kernels.reference import encoder_matmul, sparse_matmul


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """w: [F, D] -> ‖w_f‖: [F]; backward ∂w = w · g / ‖w‖ (0 where ‖w‖ = 0) in one pass over w
    (vector_norm's own backward takes three; pow/sum/sqrt took three forward)."""
    return _RowNorms.apply(w)


class _RowNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(w, dim=1)
        ctx.save_for_backward(w, norms)
        return norms

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        w, norms = ctx.saved_tensors
        scale = torch.where(norms > 0, g / norms, torch.zeros_like(norms))
        return w * scale[:, None]


@dataclass
class CLTArchitecture:
    n_layers: int
    d_model: int
    d_sae: int
    activation: str = "topk"
    k: int = 16
    topk_scope: str = "layer"  # layer: k per layer | all: k·L over all layers (sparsity.topk_all)
    bandwidth: float = 0.1
    log_threshold: bool = False
    ste_to_input: bool = False
    # provenance (not used by the math)
    subject_model: str = ""
    input_hook: str = "resid_mid"
    output_hook: str = "mlp_out"
    extra: dict = field(default_factory=dict)

    # keys that older checkpoints saved in the architecture and that are no longer part of it
    # ("decode" is a speed switch of the run, `CrossLayerTranscoder.decode_path`)
    RETIRED = ("decode",)

    @classmethod
    def from_saved(cls, d: dict) -> CLTArchitecture:
        """The architecture from a saved config (native config.json or our circuit-tracer export)."""
        return cls(**{k: v for k, v in d.items() if k not in cls.RETIRED})


class CrossLayerTranscoder(nn.Module):
    # parameters and buffers (shapes in the module docstring)
    W_enc: nn.Parameter  # [L, F, d]
    b_enc: nn.Parameter  # [L, F]
    W_dec: nn.ParameterList  # [F, L − s, d] for each source layer s
    b_dec: nn.Parameter  # [L, d]
    threshold_param: nn.Parameter  # [L, F] JumpReLU θ (or log θ)
    input_scale: torch.Tensor  # [L]
    output_scale: torch.Tensor  # [L]
    batchtopk_threshold: torch.Tensor  # [L] inference threshold (BatchTopK, cross-layer TopK)

    def __init__(self, arch: CLTArchitecture, threshold_init: float = 0.1, decode: str = "auto"):
        super().__init__()
        self.arch = arch
        # how to decode (and, for JumpReLU / ReLU, encode): "auto" (Triton on CUDA, else the torch
        # sparse or dense path), "triton", "sparse" or "dense": a speed switch, not saved
        self.decode_path = decode
        # the collectives of a feature-sharded / data-parallel mesh (clt.parallel.Parallel), set by
        # the training strategy; None: one process, the CLT alone
        self.mesh: Any = None
        self.batchtopk_min_kept: torch.Tensor | None = None  # [L], last training selection
        L, d, F = arch.n_layers, arch.d_model, arch.d_sae
        self.W_enc = nn.Parameter(torch.empty(L, F, d).uniform_(-1 / math.sqrt(F), 1 / math.sqrt(F)))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        bound = 1 / math.sqrt(L * d)
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(F, L - s, d).uniform_(-bound, bound)) for s in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        if arch.activation == "jumprelu":
            t = torch.full((L, F), float(threshold_init), dtype=torch.float32)
            self.threshold_param = nn.Parameter(t.log() if arch.log_threshold else t)
        self.register_buffer("input_scale", torch.ones(L))
        self.register_buffer("output_scale", torch.ones(L))
        # inference threshold per layer of BatchTopK and cross-layer TopK (a running estimate of
        # the smallest kept value; sparsity module docstring)
        self.register_buffer("batchtopk_threshold", torch.zeros(L))

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_sae(self) -> int:
        return self.arch.d_sae

    @property
    def threshold(self) -> torch.Tensor:
        """JumpReLU θ: [L, F], fp32."""
        p = self.threshold_param.float()
        return p.exp() if self.arch.log_threshold else p

    # -- forward pass ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, d] (subject units) -> pre-activations h: [N, L, F]."""
        x = x.to(self.W_enc.dtype) * self.input_scale[:, None]
        return encoder_matmul(x, self.W_enc) + self.b_enc  # (W_enc's gradient: sparse where ∂h is)

    def activate(self, h: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """h: [N, L', F] for the layers `layers` (default all) -> a: [N, L', F].
        TopK and BatchTopK select over the whole CLT: on a feature-sharded mesh (`self.mesh`) the
        selection is global (its collectives); alone it is local. In training mode BatchTopK and
        cross-layer TopK keep their batch's suggestion for the per-layer inference threshold
        (`batchtopk_min_kept`, [L]); out of training mode both are that threshold (a JumpReLU, the
        same for every call, so a layer can be encoded alone), as is cross-layer TopK given fewer
        than all layers."""
        kind, mesh, k = self.arch.activation, self.mesh, self.arch.k
        sharded = mesh is not None and mesh.sharded
        if kind in ("topk", "batchtopk") and self.arch.topk_scope == "all":
            if not self.training or h.shape[1] != self.n_layers:
                return act.threshold_relu(h, self.batchtopk_threshold[layers])
            if kind == "topk":
                a, self.batchtopk_min_kept = mesh.topk_all(h, k) if sharded else act.topk_all(h, k)
                if mesh is not None and mesh.data_parallel and not sharded:
                    self.batchtopk_min_kept = mesh.data_mean(self.batchtopk_min_kept)
            elif mesh is not None and (sharded or mesh.data_parallel):
                a, self.batchtopk_min_kept = mesh.batchtopk_all(h, k)
            else:
                a, self.batchtopk_min_kept = act.batchtopk_all(h, k)
            return a
        if kind == "topk":
            return mesh.topk(h, k) if sharded else act.topk(h, k)
        if kind == "batchtopk":
            if not self.training:
                return act.threshold_relu(h, self.batchtopk_threshold[layers])
            if mesh is not None and (sharded or mesh.data_parallel):
                a, self.batchtopk_min_kept = mesh.batchtopk(h, k)
            else:
                a, self.batchtopk_min_kept = act.batchtopk(h, k)
            return a
        if kind == "jumprelu":
            return act.jumprelu(h, self.threshold[layers], self.arch.bandwidth, self.arch.ste_to_input)
        if kind == "relu":
            return h.relu()
        raise ValueError(f"unknown activation {kind!r}")

    @property
    def per_layer_topk(self) -> bool:
        """TopK with k per layer, one process's features: selection from its entries."""
        return (
            self.arch.activation == "topk"
            and self.arch.topk_scope == "layer"
            and not (self.mesh is not None and self.mesh.sharded)
        )

    @property
    def inference_threshold(self) -> bool:
        """Whether the per-layer threshold (`batchtopk_threshold`) is the activation out of training."""
        return self.arch.activation == "batchtopk" or (
            self.arch.activation == "topk" and self.arch.topk_scope == "all"
        )

    def decode_normalized(
        self, a: Any, bias: bool = True, support: torch.Tensor | None = None
    ) -> torch.Tensor:
        """a: [N, L, F] or TopK's entries -> ỹ̂: [N, L, d] in normalised units (Σ over s ≤ l).
        `support`: positions that need ∂L/∂a (default: active ones); see `gradient_support`."""
        y = kernels.decode(a, list(self.W_dec), support, self.decode_path)
        if self.mesh is not None:  # this shard's features' part: the sum over the shards is the output
            y = self.mesh.sum(y)
        return y + self.b_dec if bias else y

    def gradient_support(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """Where the loss needs ∂L/∂a: the active features, and for JumpReLU also the inactive
        ones within the bandwidth of θ (their θ pseudo-gradient reads ∂L/∂a). None = active only."""
        if self.arch.activation != "jumprelu":
            return None
        band = (h.detach() - self.threshold).abs() < self.arch.bandwidth / 2
        return (a.detach() != 0) | band

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """a: [N, L, F] -> ŷ: [N, L, d] in subject units."""
        return self.decode_normalized(a) / self.output_scale[:, None]

    def encode_activate(self, x: torch.Tensor, entries: bool = False) -> tuple[torch.Tensor, Any]:
        """x: [N, L, d] -> (h, a): [N, L, F]. On the Triton path the bias and the JumpReLU / ReLU
        epilogue are fused into the encoder GEMM (same outputs and gradients). `entries`: TopK
        (not feature-sharded) gives a as its entries (`sparsity.TopKActivations`, what training
        uses: the decode, L0 and the dead-feature counters read them; no dense [N, L, F] a)."""
        kind = self.arch.activation
        if kind in ("jumprelu", "relu") and kernels.use_triton(x, self.decode_path):
            x = x.to(self.W_enc.dtype) * self.input_scale[:, None]
            theta = self.threshold if kind == "jumprelu" else None
            return kernels.encode_fused(
                x, self.W_enc, self.b_enc, theta, kind, self.arch.bandwidth, self.arch.ste_to_input
            )
        h = self.encode(x)
        return h, (self.activate_entries(h) if entries else self.activate(h))

    def jumprelu_terms(
        self, x: torch.Tensor, dec_norms: torch.Tensor, c: float
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor] | None:
        """JumpReLU's training forward from entries (`kernels.jumprelu`): x: [N, L, d] -> (h, a by
        its entries (`sparsity.SparseActivations`), E_n Σ tanh(c · a · ‖W_dec‖), E_n Σ ReLU(θ − h)
        · ‖W_dec‖), with the encoder's weight gradient from the entries. None where it does not
        apply: not JumpReLU, the dense reference path (decode "dense"), or the Triton path (which
        fuses the activation into its GEMM)."""
        if (
            self.arch.activation != "jumprelu"
            or self.decode_path == "dense"
            or kernels.use_triton(x, self.decode_path)
        ):
            return None
        x = x.to(self.W_enc.dtype) * self.input_scale[:, None]
        arch = self.arch
        return jumprelu_encode(
            x, self.W_enc, self.b_enc, self.threshold, dec_norms, arch.bandwidth, arch.ste_to_input, c
        )

    def activate_entries(self, h: torch.Tensor) -> Any:
        """`activate` as training uses it: TopK (not feature-sharded) as its entries
        (`sparsity.TopKActivations`), every other activation dense."""
        if self.per_layer_topk:
            return act.TopKActivations.of(h, self.arch.k)
        return self.activate(h)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: [N, d] input of one layer -> a: [N, F] (used when splicing into a live forward pass)."""
        return self.activate(self._preactivation_layer(x, layer)[:, None], slice(layer, layer + 1))[:, 0]

    def encode_layer_entries(
        self, x: torch.Tensor, layer: int, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x: [N, d] -> (a: [N, F], (t, f, v)): the activations and their non-zero entries
        a[t[i], f[i]] = v[i] > 0 (every activation is ≥ 0). TopK gives its entries from its own
        selection, the others from a scan of a (the feature-card pass reads the entries).
        `out`: an [N, F] tensor to write a into (a slab of a buffer the caller keeps)."""
        h = self._preactivation_layer(x, layer)
        if self.per_layer_topk:
            vals, idx = act.topk_entries(h, self.arch.k)  # [N, k]
            a = (torch.zeros_like(h) if out is None else out.zero_()).scatter_(-1, idx, vals)
            t = torch.arange(len(h), device=h.device)[:, None].expand_as(idx)
            if bool((vals > 0).all()):
                return a, (t.reshape(-1), idx.reshape(-1), vals.reshape(-1))
            on = (vals > 0).nonzero(as_tuple=True)
            return a, (t[on], idx[on], vals[on])
        a = self.activate(h[:, None], slice(layer, layer + 1))[:, 0]
        a = a if out is None else out.copy_(a)
        t, f = a.nonzero(as_tuple=True)
        return a, (t, f, a[t, f])

    def _preactivation_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: [N, d] -> h: [N, F] of one layer."""
        x = x.to(self.W_enc.dtype) * self.input_scale[layer]
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def decode_layer(self, acts: list[torch.Tensor], layer: int) -> torch.Tensor:
        """acts[s]: [N, F] for s ≤ layer -> ŷ_layer: [N, d] in subject units."""
        if self.mesh is not None:  # this shard's features' part, summed over the shards
            part = sum(sparse_matmul(acts[s], self.W_dec[s][:, layer - s]) for s in range(layer + 1))
            return (self.mesh.sum(part) + self.b_dec[layer]) / self.output_scale[layer]
        y = self.b_dec[layer]
        for s in range(layer + 1):
            y = y + sparse_matmul(acts[s], self.W_dec[s][:, layer - s])
        return y / self.output_scale[layer]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, L, d] -> (a: [N, L, F], ŷ: [N, L, d])."""
        _, a = self.encode_activate(x)
        return a, self.decode(a)

    @torch.no_grad()
    def update_batchtopk_threshold(self, decay: float) -> None:
        min_kept = self.batchtopk_min_kept
        if min_kept is None:
            return
        fresh = self.batchtopk_threshold == 0
        ema = decay * self.batchtopk_threshold + (1 - decay) * min_kept
        new = torch.where(fresh, min_kept, ema)  # a layer with no suggestion (NaN) keeps its value
        self.batchtopk_threshold.copy_(torch.where(torch.isnan(min_kept), self.batchtopk_threshold, new))
        self.batchtopk_min_kept = None

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec,i^s‖ over all target layers, in normalised units: [L, F]."""
        return torch.stack([row_norms(w.reshape(w.shape[0], -1)) for w in self.W_dec])

    # -- normalisation folding -------------------------------------------------------------------
    @torch.no_grad()
    def folded(self) -> CrossLayerTranscoder:
        """An equivalent CLT with input/output scales 1: s_in folded into W_enc, 1/s_out into W_dec
        and b_dec (thresholds act on h, which does not change)."""
        new = CrossLayerTranscoder(self.arch, decode=self.decode_path)
        new.load_state_dict(self.state_dict())
        new.W_enc.mul_(self.input_scale[:, None, None])
        for s, w in enumerate(new.W_dec):
            w.div_(self.output_scale[s:][None, :, None])
        new.b_dec.div_(self.output_scale[:, None])
        new.input_scale.fill_(1.0)
        new.output_scale.fill_(1.0)
        return new

    # -- checkpoints: the formats live in clt/io.py; these are the usual names for its two calls --
    def save_pretrained(self, directory: str | os.PathLike, summary: dict | None = None) -> Path:
        """Write the native checkpoint (`clt.io.save_native`)."""
        from .io import save_native

        return save_native(self, directory, summary)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **hub
    ) -> CrossLayerTranscoder:
        """A CLT from any checkpoint `clt.io.load_clt` reads: a native or sharded dir, a run dir, a
        circuit-tracer export, or a Hub repo id (`hub`: revision, subfolder, cache_dir,
        local_files_only, token)."""
        from .io import load_clt

        return load_clt(name_or_path, device, **hub)
