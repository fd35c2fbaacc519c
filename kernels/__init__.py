"""Fused Triton kernels for CLT encode and sparse cross-layer decode (filled by a later issue).

The plain-torch reference paths live in `clt.model` (`decode_dense`, `decode_sparse`).
"""
