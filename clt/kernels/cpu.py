"""The CLT's CPU kernels (cpu_decode.c): the sparse decode forward and backward, the transposed
pattern, and the encoder weight gradient from a sparse ∂h. Compiled once per machine with the
system's C compiler into a cache directory, called through ctypes, one share of the work per
thread (ctypes drops the GIL during a call).

Why a kernel: the decode reads, per (source, target) slab, one decoder row per active entry. The
torch path (embedding_bag per slab, `reference._TiledDecode`) pays a copy of every slab, a fresh
[n, d] output per slab and an add into the reconstruction; the kernel keeps a panel of the output
in L2 across all sources of a target, which at the demo shape makes the decode ~2x faster.

Threads split the target layers (`_target_sets`). `library()` is None where no compiler is found
or the build fails (then the torch path runs); the environment variable CLT_CPU_KERNEL=0 turns the
kernel off. The cache is CLT_KERNEL_CACHE, else ~/.cache/clt/kernels; the file name carries a hash
of the source, the flags and the CPU, so a shared home directory serves machines with different
instruction sets.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc keeps to 256-bit vectors on AVX-512 otherwise


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    env = os.environ.get("CLT_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clt" / "kernels"


def _build(so: Path) -> None:
    """Compile into a temporary file beside `so`, then rename: concurrent builders never see a torn
    library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=so.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, a failed build, CLT_CPU_KERNEL=0)."""
    if os.environ.get("CLT_CPU_KERNEL", "1") == "0" or platform.system() != "Linux":
        return None
    key = hashlib.sha256((SOURCE.read_text() + " ".join(FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    so = _cache_dir() / f"cpu_decode-{key}.so"
    try:
        if not so.exists():
            _build(so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(
            f"CPU decode kernel unavailable, using the torch path: {detail.strip()[:200]}", stacklevel=2
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.clt_decode_forward.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.clt_decode_backward_vals.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr]
    lib.clt_decode_backward_W.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.clt_group_by_feature.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.clt_encoder_weight_grad.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64]
    lib.clt_jumprelu_count.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.clt_jumprelu_entries.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64]
    lib.clt_encoder_weight_grad_entries.argtypes = [i64, i64, i64] + [ptr] * 10 + [i64]
    lib.clt_panel_width.argtypes = [i64, i64, i64]
    lib.clt_panel_width.restype = i64
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors: on CPU, fp32 values, and the kernel built."""
    floats = [t for t in tensors if t.is_floating_point()]
    return (
        all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype == torch.float32 for t in floats)
        and (library() is not None)
    )


@functools.cache
def _pool(n: int, pid: int) -> ThreadPoolExecutor:
    """n worker threads of this process (by pid: a forked child has none of its parent's)."""
    return ThreadPoolExecutor(n, thread_name_prefix="clt-decode")


def _pointers(ts) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _target_sets(L: int) -> list[torch.Tensor]:
    """The target layers split across threads with equal work (target t reads t + 1 slabs):
    greedily, the heaviest first to the least loaded."""
    k = max(1, min(torch.get_num_threads(), L))
    sets: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for t in reversed(range(L)):
        j = load.index(min(load))
        sets[j].append(t)
        load[j] += t + 1
    return [torch.tensor(sorted(ts), dtype=torch.int64) for ts in sets if ts]


def _scratch(size: int) -> list[torch.Tensor]:
    """One scratch buffer of `size` floats per thread (packed panels)."""
    return [torch.empty(size) for _ in range(max(1, torch.get_num_threads()))]


def _parallel(fn, calls: list[tuple]) -> None:
    """fn(*args) for each args in calls, one thread each."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    for f in [_pool(len(calls), os.getpid()).submit(fn, *a) for a in calls]:
        f.result()


def _run(fn, head: tuple, L: int, per_thread=None) -> None:
    """fn(*head, targets, n_targets, *per_thread(j)) for each thread j's target set."""
    sets = _target_sets(L)  # (alive until the calls return: they hold its pointers)
    calls = [
        (*head, ts.data_ptr(), ts.numel(), *(per_thread(j) if per_thread else ()))
        for j, ts in enumerate(sets)
    ]
    _parallel(fn, calls)


def _contig(ts) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


def _nnz(entries) -> torch.Tensor:
    """[L] int64: the number of entries of each source layer."""
    return torch.tensor([e.numel() for e in entries], dtype=torch.int64)


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "the CPU kernel is not built: check kernels.cpu.usable() first"
    return lib


def forward(cols, vals, offsets, Ws, n: int) -> torch.Tensor:
    """[n, L, d]; cols/vals/offsets per source layer as in `reference.decode_entries`."""
    lib = _lib()
    L, d = len(Ws), Ws[0].shape[-1]
    Ws, cols, vals, offsets = _contig(Ws), _contig(cols), _contig(vals), _contig(offsets)
    nnz = _nnz(cols)
    out = Ws[0].new_empty(n, L, d)
    F = Ws[0].shape[0]
    head = (L, n, d, F, _pointers(Ws), _pointers(cols), _pointers(vals), _pointers(offsets), nnz.data_ptr())
    bufs = _scratch((F + n) * lib.clt_panel_width(F, n, d))
    _run(lib.clt_decode_forward, (*head, out.data_ptr()), L, lambda j: (bufs[j].data_ptr(),))
    return out


def backward_vals(cols, offsets, Ws, g: torch.Tensor) -> list[torch.Tensor]:
    """∂vals per source layer, from g = ∂L/∂out ([n, L, d], contiguous)."""
    lib = _lib()
    n, L, d = g.shape
    Ws, cols, offsets = _contig(Ws), _contig(cols), _contig(offsets)
    nnz = _nnz(cols)
    k = len(_target_sets(L))
    partial = [[g.new_zeros(c.numel()) for c in cols] for _ in range(k)]  # one per thread
    ptrs = [_pointers(p) for p in partial]
    F = Ws[0].shape[0]
    head = (L, n, d, F, _pointers(Ws), _pointers(cols), _pointers(offsets), nnz.data_ptr(), g.data_ptr())
    bufs = _scratch((F + n) * lib.clt_panel_width(F, n, d))
    _run(lib.clt_decode_backward_vals, head, L, lambda j: (ptrs[j], bufs[j].data_ptr()))
    for p in partial[1:]:
        torch._foreach_add_(partial[0], p)
    return partial[0]


def group_by_feature(rows, cols, vals, F: int) -> tuple[list, list, list]:
    """The entries of each source layer grouped by feature (stable): (rows, vals, offsets [F])."""
    lib = _lib()
    rows, cols, vals = _contig(rows), _contig(cols), _contig(vals)
    nnz = _nnz(cols)
    t_rows, t_vals = [torch.empty_like(r) for r in rows], [torch.empty_like(v) for v in vals]
    offsets = [torch.empty(F, dtype=torch.int64) for _ in cols]
    cursor = torch.empty(F, dtype=torch.int64)
    lib.clt_group_by_feature(
        len(cols),
        F,
        _pointers(rows),
        _pointers(cols),
        _pointers(vals),
        nnz.data_ptr(),
        _pointers(t_rows),
        _pointers(t_vals),
        _pointers(offsets),
        cursor.data_ptr(),
    )
    return t_rows, t_vals, offsets


def backward_W(t_rows, t_vals, f_offsets, Ws, g: torch.Tensor) -> list[torch.Tensor]:
    """∂W_dec per source layer from the entries grouped by feature (`f_offsets[s]`: [F])."""
    lib = _lib()
    n, L, d = g.shape
    F = Ws[0].shape[0]
    t_rows, t_vals, f_offsets = _contig(t_rows), _contig(t_vals), _contig(f_offsets)
    nnz = _nnz(t_rows)
    dW = [torch.empty_like(W, memory_format=torch.contiguous_format) for W in Ws]
    head = (L, n, d, F, _pointers(t_rows), _pointers(t_vals), _pointers(f_offsets), nnz.data_ptr())
    bufs = _scratch(n * d)
    _run(lib.clt_decode_backward_W, (*head, g.data_ptr(), _pointers(dW)), L, lambda j: (bufs[j].data_ptr(),))
    return dW


def encoder_weight_grad(dh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dh: [n, L, F] (mostly zeros), x: [n, L, d] -> Σ_n dh[n, l, f] x[n, l]: [L, F, d], reading only
    the non-zero dh; threads split the layers."""
    lib = _lib()
    dh, x = dh.contiguous(), x.contiguous()
    n, L, F = dh.shape
    d = x.shape[-1]
    dW = dh.new_empty(L, F, d)
    sets = _layer_sets(L)
    calls = [(n, L, F, d, dh.data_ptr(), x.data_ptr(), dW.data_ptr(), s.data_ptr(), s.numel()) for s in sets]
    _parallel(lib.clt_encoder_weight_grad, calls)
    return dW


def _layer_sets(L: int) -> list[torch.Tensor]:
    """The layers split across threads round-robin (for work that costs the same per layer)."""
    k = max(1, min(torch.get_num_threads(), L))
    return [torch.arange(j, L, k) for j in range(k)]


def jumprelu_scan(h: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor):
    """JumpReLU's pass over h: [n, L, F] (θ, lo = θ − ε/2: [L, F]) -> (rows, cols, hv, counts,
    R, C): the entries h > lo layer by layer in (token, feature) order (rows, cols: int64, hv: h
    there; counts: [L] int64 per layer), R = Σ_n ReLU(θ − h) and C = #{n: h < θ}: [L, F]. h is
    read layer-major ([L, n, F] in memory, e.g. the transpose of a batched GEMM's output)."""
    lib = _lib()
    n, L, F = h.shape
    h = h.transpose(0, 1).contiguous()  # (no copy when h is a layer-major view)
    theta, lo = theta.contiguous(), lo.contiguous()
    counts = torch.empty(L, dtype=torch.int64)
    R, C = h.new_empty(L, F), h.new_empty(L, F)
    sets = _layer_sets(L)
    acc = [torch.empty(F, dtype=torch.float64) for _ in sets]
    ptrs = [t.data_ptr() for t in (h, theta, lo, counts, R, C)]
    _parallel(
        lib.clt_jumprelu_count,
        [(n, L, F, *ptrs, s.data_ptr(), s.numel(), a.data_ptr()) for s, a in zip(sets, acc)],
    )
    starts = counts.cumsum(0) - counts
    total = int(counts.sum())
    rows, cols = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=torch.int64)
    hv = h.new_empty(total)
    ptrs = [t.data_ptr() for t in (h, lo, starts, rows, cols, hv)]
    _parallel(lib.clt_jumprelu_entries, [(n, L, F, *ptrs, s.data_ptr(), s.numel()) for s in sets])
    return rows, cols, hv, counts, R, C


def encoder_weight_grad_entries(x, counts, rows, cols, g, D, xsum) -> torch.Tensor:
    """x: [n, L, d]; entries layer by layer (counts: [L] int64; rows, cols, g: [E]); D: [L, F];
    xsum = Σ_n x: [L, d] -> D[l, f] xsum[l] + Σ_{entries of (l, f)} g x[row, l]: [L, F, d]."""
    lib = _lib()
    x, rows, cols, g, D, xsum = (t.contiguous() for t in (x, rows, cols, g, D, xsum))
    counts = counts.contiguous()
    n, L, d = x.shape
    F = D.shape[-1]
    starts = counts.cumsum(0) - counts
    dW = x.new_empty(L, F, d)
    ptrs = [t.data_ptr() for t in (x, starts, counts, rows, cols, g, D, xsum, dW)]
    sets = _layer_sets(L)  # (alive until the calls return: they hold its pointers)
    calls = [(L, F, d, *ptrs, s.data_ptr(), s.numel()) for s in sets]
    _parallel(lib.clt_encoder_weight_grad_entries, calls)
    return dW
