"""The Hugging Face Hub: download a CLT into the local cache (`hub_download`) and tell a repo id
from a local path (`looks_like_repo_id`). Pushing is clt/push.py; reading the files, clt/io.py."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import CheckpointError


def hub_download(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Path:
    """Download a CLT from the Hub into the local cache (huggingface_hub's; offline mode and
    `local_files_only` read only from it) and return its directory: native (`config.json` +
    `model.safetensors`) or circuit-tracer (`config.yaml` + `W_enc_*`/`W_dec_*`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def get(name: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                name,
                subfolder=subfolder or None,
                revision=revision,
                cache_dir=None if cache_dir is None else Path(cache_dir),
                local_files_only=local_files_only,
                token=token,
            )
        )

    where = f"{repo_id}" + (f"@{revision}" if revision else "") + (f"/{subfolder}" if subfolder else "")
    try:
        try:
            get("model.safetensors")
            return get("config.json").parent
        except RemoteEntryNotFoundError:  # not native: circuit-tracer's layout
            cfg = get("config.yaml")
        n_layers = (yaml.safe_load(cfg.read_text()).get("clt") or {}).get("architecture", {}).get("n_layers")
        layer = 0
        while n_layers is None or layer < n_layers:
            try:
                get(f"W_enc_{layer}.safetensors")
            except RemoteEntryNotFoundError:
                if n_layers is None and layer > 0:
                    break
                raise
            get(f"W_dec_{layer}.safetensors")
            layer += 1
        return cfg.parent
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"no CLT at {where}: no such local directory, and no such Hub repo (or it needs "
            "a token: HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"no revision {revision!r} in {repo_id}") from e
    except RemoteEntryNotFoundError as e:
        raise CheckpointError(
            f"{where} holds no CLT (neither config.json + model.safetensors nor a circuit-tracer config.yaml)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{where}: no such local directory, and not in the local Hugging Face cache "
            f"while the Hub cannot be reached (offline mode, HF_HUB_OFFLINE, or no network): {e}"
        ) from e


def looks_like_repo_id(name: str) -> bool:
    """ "user/name" or "name", and not a path into a local directory (`runs/x` when `runs/` exists)."""
    parts = str(name).split("/")
    return (
        len(parts) in (1, 2)
        and all(parts)
        and not str(name).startswith((".", "~"))
        and not (len(parts) == 2 and Path(parts[0]).is_dir())
    )
