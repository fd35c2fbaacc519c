"""Training checkpoints you can trust: checksummed, rotated, verified on resume.

In `run_dir/checkpoints/`, each save of step S writes `step-S.ckpt` (and, feature-sharded,
`step-S.shard-KKK-of-WWW.ckpt`), then, once every file is complete, the manifest `step-S.sha256`
(JSON: the step and each file's size and sha256), then hard links `last.ckpt` (`last.shard-…`)
to the new files, then deletes all but the newest `trainer.keep_checkpoints`. A checkpoint exists
only once its manifest does: one cut short by a crash, a kill or a full disk has none and is never
resumed from (nor kept).

Resume (`resume_checkpoint`) takes the newest checkpoint whose files match their manifest, and
warns about each newer one that does not (truncated, bit-flipped, missing), setting it aside as
`*.damaged`; it never falls back silently to step 0: when checkpoints exist and none is intact,
that is an error. A run from before manifests (a bare `last.ckpt`) resumes from it as before.
`verify(run_dir)` is `clt verify RUN_DIR`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..errors import CheckpointError
from ..files import sha256, write_atomic

_STEP = re.compile(r"^step-(\d+)\.sha256$")


def stem(step: int) -> str:
    return f"step-{step:07d}"


def files_of(directory: Path, name: str) -> list[Path]:
    """The files of checkpoint `name` (a stem): the main file and its shard files."""
    return [directory / f"{name}.ckpt", *sorted(directory.glob(f"{name}.shard-*-of-*.ckpt"))]


def write_manifest(directory: Path, step: int) -> Path:
    """Checksum the files of step `step` (all written) into its manifest: the checkpoint exists."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files_of(directory, stem(step))
    }
    path = directory / f"{stem(step)}.sha256"
    write_atomic(path, json.dumps({"step": step, "files": files}, indent=1))
    return path


def publish_last(directory: Path, step: int) -> None:
    """`last.ckpt` (and `last.shard-…`) as hard links to step `step`'s files (copies where the file
    system has no hard links); other meshes' `last.shard-…` removed."""
    import shutil

    names = set()
    for src in files_of(directory, stem(step)):
        dst = directory / src.name.replace(stem(step), "last", 1)
        names.add(dst.name)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    for p in directory.glob("last.shard-*-of-*.ckpt"):
        if p.name not in names:
            p.unlink(missing_ok=True)


def steps(directory: Path) -> list[int]:
    """The steps that have a manifest, newest first."""
    found = [int(m.group(1)) for p in directory.glob("step-*.sha256") if (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def damage(directory: Path, step: int) -> str | None:
    """Why step `step`'s checkpoint cannot be trusted (None: every file matches its manifest)."""
    try:
        manifest = json.loads((directory / f"{stem(step)}.sha256").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, want in files.items():
        p = directory / name
        if not p.exists():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, the manifest says {want['bytes']:,} (truncated?)"
        if sha256(p) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged on disk)"
    return None


def rotate(directory: Path, keep: int, current: int) -> None:
    """Delete all but the newest `keep` checkpoints, and the files of saves cut short (no manifest)."""
    kept = steps(directory)[:keep]
    for p in directory.glob("step-*"):
        m = re.match(r"^step-(\d+)", p.name)
        if m and int(m.group(1)) not in kept and int(m.group(1)) != current:
            p.unlink(missing_ok=True)


def set_aside(directory: Path, step: int) -> None:
    """Rename a damaged checkpoint's files (and manifest) to `*.damaged`: kept for inspection,
    never resumed from, not counted against `keep_checkpoints`."""
    for p in [*files_of(directory, stem(step)), directory / f"{stem(step)}.sha256"]:
        if p.exists():
            os.replace(p, p.with_name(p.name + ".damaged"))


def resume_checkpoint(run_dir: Path, dry_run: bool = False) -> Path | None:
    """The checkpoint a resume of `run_dir` starts from: the newest intact one (module docstring);
    None for a run with no checkpoint at all. Damaged newer ones are warned about (and set aside
    unless `dry_run`)."""
    directory = run_dir / "checkpoints"
    found = steps(directory) if directory.exists() else []
    if not found:
        legacy = directory / "last.ckpt"
        return legacy if legacy.exists() else None
    bad: list[tuple[int, str]] = []
    for step in found:
        why = damage(directory, step)
        if why is None:
            for s, reason in bad:
                print(
                    f"warning: checkpoint {directory / stem(s)}.ckpt (step {s}) cannot be trusted: {reason}; "
                    f"resuming from step {step} instead",
                    file=sys.stderr,
                )
                if not dry_run:
                    set_aside(directory, s)
            if bad and not dry_run:
                publish_last(directory, step)
            return directory / f"{stem(step)}.ckpt"
        bad.append((step, why))
    detail = "; ".join(f"step {s}: {why}" for s, why in bad)
    raise CheckpointError(
        f"no intact checkpoint in {directory} ({detail}); nothing to resume from: start a new run_dir"
    )


def verify(run_dir: Path) -> int:
    """`clt verify RUN_DIR`: each checkpoint's state, printed; 0 when every one is intact, 1 when a
    resume would fall back to an older one, 2 when nothing can be resumed."""
    from ..io import verify_native

    directory = run_dir / "checkpoints"
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    found = steps(directory) if directory.exists() else []
    states = [(s, damage(directory, s)) for s in found]
    for s, why in states:
        print(f"{directory / stem(s)}.ckpt  step {s}  " + ("ok" if why is None else f"DAMAGED: {why}"))
    if not found and (directory / "last.ckpt").exists():
        print(f"{directory / 'last.ckpt'}  (no manifest: written before checksums; not verified)")
    native = run_dir / "clt"
    if native.exists():
        why = verify_native(native)
        print(f"{native}  " + ("ok" if why is None else f"DAMAGED: {why}"))
    good = [s for s, why in states if why is None]
    if found and not good:
        print(f"nothing to resume from in {run_dir}")
        return 2
    if states and states[0][1] is not None:
        print(f"a resume would start from step {good[0]} (the newest intact checkpoint)")
        return 1
    return 0 if all(why is None for _, why in states) else 1
