"""Push a trained CLT to the Hugging Face Hub.

    python -m clt.push runs/my-run user/my-clt [--revision BRANCH] [--private] [--no-export]

Uploads the native checkpoint, the circuit-tracer export (circuit_tracer/) and a model card with
the run's metrics (clt.io.push_to_hub). Token: `huggingface-cli login` or HF_TOKEN; another Hub:
HF_ENDPOINT. Load it back with CrossLayerTranscoder.from_pretrained("user/my-clt").
"""

from __future__ import annotations

import argparse
import sys

from .errors import command


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
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the circuit-tracer export",
    )
    args = p.parse_args(argv)
    from .io import push_to_hub

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
