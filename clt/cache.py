"""Generate an activation cache once, train many CLTs from it (`data=cached data.cache=DIR`).

    python -m clt.cache cache.dir=cache/sotu cache.tokens=1000000          # the bundled default
    python -m clt.cache model=hf model.name_or_path=gpt2 data=openwebtext cache.dir=… cache.tokens=2e8
    sbatch --array=0-15 slurm/cache.sbatch cache.dir=… …                   # 16 tasks, one slice each
    python -m clt.cache verify DIR        # check every shard's sha256 against the manifest
    python -m clt.cache merge DIR         # write the manifest once every task's shards are there

The same model/data groups as train.py (conf/cache.yaml); keys in clt/config.py (CacheConfig).
Running the same command again resumes: finished, intact shards are kept, damaged ones rewritten.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from clt.config import CacheJobConfig, load_config
from clt.errors import command


@command
def _tool(argv: list[str]) -> int:
    import argparse

    from clt.data.activation_cache import finalize

    p = argparse.ArgumentParser(
        prog="python -m clt.cache",
        description="verify: check every shard against its checksum; merge: write the "
        "manifest of a cache whose shards several tasks wrote",
    )
    p.add_argument("action", choices=["verify", "merge"])
    p.add_argument("dir")
    args = p.parse_args(argv)
    m = finalize(args.dir, required=True, verify=True)
    assert m is not None
    print(
        f"{args.dir}: {m['n_shards']} shards, {m['tokens']} tokens, {m['documents']} documents, "
        f"{m['storage']}, every checksum ok; manifest written"
    )
    return 0


@hydra.main(version_base=None, config_path="../conf", config_name="cache")
def main(cfg: DictConfig) -> None:
    if code := cache(cfg):
        sys.exit(code)


@command
def cache(cfg: DictConfig) -> None:
    import torch

    from clt.data.activation_cache import generate
    from clt.subject import load_subject

    job = load_config(cfg, CacheJobConfig)
    device = (
        "cuda"
        if job.device == "auto" and torch.cuda.is_available()
        else ("cpu" if job.device == "auto" else job.device)
    )
    manifest = generate(load_subject(job.model, device), job, progress=True)
    if manifest is None:
        print(f"{job.cache.dir}: this task's shards are written; the manifest follows when every task's are")
    else:
        mb = sum(s["bytes"] for s in manifest["shards"]) / 2**20
        print(
            f"{job.cache.dir}: {manifest['tokens']} tokens in {manifest['n_shards']} shards ({mb:.1f} MiB, "
            f"{manifest['storage']}); train with data=cached data.cache={job.cache.dir}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("verify", "merge"):
        sys.exit(_tool(sys.argv[1:]))
    main()
