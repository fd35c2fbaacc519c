"""The `clt` command, one front door: `clt train …` (Hydra overrides, the same as `python train.py`),
`clt cache …`, `clt attribute …`, `clt features …`, `clt serve …`, `clt view …`, `clt heads …`,
`clt pinpoint …`, `clt export-circuit-tracer …`, `clt import-circuit-tracer …`, `clt push …`
(also `python -m clt …`).
Each runs inside `clt.errors.command`: a user error is one line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from .config import WEIGHT_DTYPES
from .errors import CLTError, command


def _hydra_app(script: list[str], argv: list[str]) -> int:
    """Run a Hydra app in a fresh interpreter (Hydra reads sys.argv, and the processes Lightning
    launches for more devices re-run the same command line)."""
    import os

    os.execv(sys.executable, [sys.executable, *script, *argv])
    return 0  # not reached


def train_main(argv: list[str]) -> int:
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train.py"
    if not script.exists():
        raise CLTError(
            f"clt train runs {script} and the conf/ tree beside it: use a checkout of the repository"
        )
    return _hydra_app([str(script)], argv)


def cache_main(argv: list[str]) -> int:
    return _hydra_app(["-m", "clt.cache"], argv)


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clt export-circuit-tracer",
        description="Write a CLT in circuit-tracer's layout (config.yaml, W_enc_{l} and "
        "W_dec_{l} safetensors, normalisation folded in).",
    )
    p.add_argument("checkpoint", help="run dir or native CLT dir")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES)
    p.add_argument(
        "--model-name", default=None, help="model_name in config.yaml (default: the subject model)"
    )
    args = p.parse_args(argv)
    from .io import export_circuit_tracer, load_clt

    out = export_circuit_tracer(load_clt(args.checkpoint), args.out, args.dtype, args.model_name)
    print(f"wrote {out}")
    return 0


def import_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clt import-circuit-tracer",
        description="Read a circuit-tracer cross-layer transcoder into a native checkpoint.",
    )
    p.add_argument("directory", help="circuit-tracer transcoder dir (config.yaml + W_enc_*/W_dec_* files)")
    p.add_argument("out", help="native checkpoint dir to write")
    args = p.parse_args(argv)
    from .io import import_circuit_tracer

    out = import_circuit_tracer(args.directory).save_pretrained(args.out)
    print(f"wrote {out}")
    return 0


def push_main(argv: list[str]) -> int:
    from .push import main as push

    return push(argv)


def features_main(argv: list[str]) -> int:
    from .features.__main__ import entry

    return entry(argv)


def serve_main(argv: list[str]) -> int:
    from .viewer.__main__ import serve_main as serve

    return serve(argv)


def view_main(argv: list[str]) -> int:
    from .viewer.__main__ import view_main as view

    return view(argv)


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clt verify",
        description="Check a run directory's checkpoints against their checksums: each one ok or "
        "DAMAGED (and why). Exit 0: all intact; 1: a resume would fall back to an older one; "
        "2: nothing to resume from.",
    )
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    from pathlib import Path

    from .training.checkpoints import verify

    return verify(Path(args.run_dir))


def heads_main(argv: list[str]) -> int:
    from .circuits.report import main as heads

    return heads(argv)


def pinpoint_main(argv: list[str]) -> int:
    from .circuits.command import main as pinpoint

    return pinpoint(argv)


def convert_main(argv: list[str]) -> int:
    from .convert import main as convert

    return convert(argv)


COMMANDS = {
    "train": train_main,
    "cache": cache_main,
    "export-circuit-tracer": export_main,
    "import-circuit-tracer": import_main,
    "push": push_main,
    "features": features_main,
    "serve": serve_main,
    "view": view_main,
    "verify": verify_main,
    "heads": heads_main,
    "pinpoint": pinpoint_main,
    "convert": convert_main,
}


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*COMMANDS, "attribute"):
        print(
            "usage: clt "
            "{train,cache,attribute,features,serve,view,heads,pinpoint,convert,verify,export-circuit-tracer,"
            "import-circuit-tracer,push} "
            "…  (each with --help)\n"
            "  train                  train a CLT: Hydra overrides (same as python train.py)\n"
            "  cache                  generate an activation cache (same as python -m clt.cache)\n"
            "  attribute              attribution graph of a prompt (same as python -m clt.attribute)\n"
            "  features               feature cards of a CLT (same as python -m clt.features)\n"
            "  serve                  the local interactive viewer of a folder of graphs\n"
            "  view                   one self-contained HTML file of a graph (--export)\n"
            "  heads                  score every attention head of a model (induction, composition…)\n"
            "  pinpoint               trace a task's attention circuit (IOI, …) and prune it\n"
            "  convert                TopK / BatchTopK CLT -> JumpReLU (same as python -m clt.convert)\n"
            "  verify                 check a run directory's checkpoints against their checksums\n"
            "  export-circuit-tracer  write a CLT in circuit-tracer's layout\n"
            "  import-circuit-tracer  read a circuit-tracer CLT into a native checkpoint\n"
            "  push                   upload a trained CLT to the Hugging Face Hub (same as python -m "
            "clt.push)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "attribute":
        from .attribute import main as attribute_main

        return attribute_main(argv[1:])
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
