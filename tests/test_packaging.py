"""Packaging facts a user would trip over."""

import importlib.util

from clt import kernels


def test_our_kernels_live_under_clt_and_the_name_kernels_is_free():
    """The Triton kernels are `clt.kernels`: a top-level `kernels` package of ours would be taken by
    transformers for the Hugging Face `kernels` library (hence the version cap this move removed).
    The top-level name is that library's (transformers ≥ 5.25 depends on it) or nobody's."""
    from pathlib import Path

    from conftest import REPO

    assert "Triton" in kernels.__doc__
    assert Path(kernels.__file__).resolve().parent == REPO / "clt" / "kernels"
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # the Hugging Face library, installed as a package, never a folder of this repo
        assert spec.origin is not None and "site-packages" in Path(spec.origin).parts
        assert Path(spec.origin).resolve().parent != REPO / "kernels"


def test_train_help_lists_groups():
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0
    for group in (
        "clt: batchtopk, jumprelu, relu, topk",
        "model:",
        "data:",
        "trainer: cpu, ddp, gpu",
        "logger:",
    ):
        assert group in out.stdout, group
