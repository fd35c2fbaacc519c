"""Packaging facts a user would trip over."""

import importlib.util

from clt import kernels


def test_our_kernels_live_under_clt_and_the_name_kernels_is_free():
    """The Triton kernels are `clt.kernels`: a top-level `kernels` package would be taken by
    transformers for the Hugging Face `kernels` library (hence the version cap this move removed)."""
    from transformers.utils import import_utils

    assert "Triton" in kernels.__doc__
    assert importlib.util.find_spec("kernels") is None
    assert not import_utils.is_kernels_available()


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
