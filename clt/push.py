"""Push a trained CLT to the Hugging Face Hub.

    python -m clt.push runs/my-run user/my-clt [--revision BRANCH] [--private] [--no-export]

Uploads the native checkpoint, the circuit-tracer export (circuit_tracer/) and a model card with
the run's metrics (`push_to_hub`). Token: `huggingface-cli login` or HF_TOKEN; another Hub:
HF_ENDPOINT. Load it back with CrossLayerTranscoder.from_pretrained("user/my-clt").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import WEIGHT_DTYPES
from .errors import CheckpointError, command
from .io import export_circuit_tracer, load_clt
from .model import CrossLayerTranscoder


def _checkpoint_parts(path: Path) -> tuple[Path, Path | None]:
    """(native checkpoint dir, run dir or None) of a run dir or a native checkpoint dir."""
    if (path / "clt").is_dir():
        return path / "clt", path
    run = path.parent if (path.parent / "config.json").exists() and path.name == "clt" else None
    return path, run


def push_to_hub(
    checkpoint: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    export: bool = True,
    dtype: str = "float32",
) -> str:
    """Upload a trained CLT to the Hub repo `repo_id` (created if needed; `revision`: a branch,
    created from main if needed): the native checkpoint at the repo root (`config.json`,
    `model.safetensors`, as written by training), circuit-tracer's layout under `circuit_tracer/`,
    the feature cards under `features/` (when `clt features` wrote a store for this CLT), a model card
    (`README.md`: subject model, hooks, architecture, per-layer FVU/L0, CE-loss score, how to load),
    and from a run dir its `report.json`, `loss_curve.png` and training config.
    `checkpoint`: a run dir or a native checkpoint dir (sharded ones are reassembled). Returns the
    commit URL. Uses huggingface_hub (token from `huggingface-cli login` / HF_TOKEN, Hub from
    HF_ENDPOINT)."""
    import shutil
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .card import model_card

    native, run = _checkpoint_parts(Path(checkpoint))
    clt = load_clt(native)
    with tempfile.TemporaryDirectory(prefix="clt-push-") as tmp:
        stage = Path(tmp) / "repo"
        if (native / "model.safetensors").exists():  # the files training wrote, as they are
            stage.mkdir()
            for name in ("config.json", "model.safetensors"):
                shutil.copy2(native / name, stage / name)
        else:  # feature-sharded: one whole checkpoint
            clt.save_pretrained(stage)
        if export:
            export_circuit_tracer(clt, stage / "circuit_tracer", dtype=dtype)
        report, train_cfg = None, None
        if run is not None:
            if (run / "report.json").exists():
                report = json.loads((run / "report.json").read_text())
            train_cfg = json.loads((run / "config.json").read_text())
            for src, dst in (
                ("report.json", "report.json"),
                ("loss_curve.png", "loss_curve.png"),
                ("config.json", "training_config.json"),
            ):
                if (run / src).exists():
                    shutil.copy2(run / src, stage / dst)
        features = _feature_store(run or native, clt)
        if features is not None:  # the feature cards, as `clt features` wrote them
            shutil.copytree(features.dir, stage / "features")
        summary = json.loads((stage / "config.json").read_text()).get("summary", {})
        (stage / "README.md").write_text(
            model_card(
                clt.arch,
                repo_id,
                report or summary,
                train_cfg,
                circuit_tracer=export,
                features=features.manifest if features else None,
            )
        )
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=stage,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message
                or f"Upload CLT ({clt.arch.n_layers} layers × {clt.arch.d_sae} features)",
            )
        except HfHubHTTPError as e:
            raise CheckpointError(f"pushing {checkpoint} to {repo_id} failed: {e}") from e
    return str(getattr(info, "commit_url", info))


def _feature_store(checkpoint: Path, clt: CrossLayerTranscoder):
    """The feature store next to a checkpoint if it was built for this CLT (else None, with a
    warning when it is another CLT's)."""
    from .features.pipeline import default_store_dir
    from .features.store import FeatureError, FeatureStore

    d = default_store_dir(checkpoint)
    if not (d / "manifest.json").exists():
        return None
    store = FeatureStore(d)
    try:
        store.check(clt)
    except FeatureError as e:
        print(f"warning: not pushing the feature cards: {e}", file=sys.stderr)
        return None
    return store


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clt.push", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run dir or native CLT checkpoint dir")
    p.add_argument("repo_id", help="Hub repo, user/name (created if needed)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--no-export", action="store_true", help="skip the circuit-tracer export")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=WEIGHT_DTYPES,
        help="dtype of the circuit-tracer export",
    )
    args = p.parse_args(argv)
    url = push_to_hub(
        args.checkpoint,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.message,
        export=not args.no_export,
        dtype=args.dtype,
    )
    print(f"pushed {args.checkpoint} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
