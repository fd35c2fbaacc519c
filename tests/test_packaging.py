"""Packaging facts a user would trip over."""

import importlib.util

import kernels


def test_kernels_package_is_ours_and_not_taken_for_hf_kernels():
    from transformers.utils import import_utils

    assert importlib.util.find_spec("kernels") is not None
    assert "Triton" in kernels.__doc__  # our package, not Hugging Face's `kernels`
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
