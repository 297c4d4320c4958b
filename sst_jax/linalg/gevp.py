"""Generalized symmetric eigenproblem A v = λ B v (B SPD): LAPACK on CPU, Cholesky reduction elsewhere.

Both paths solve the same damped problem the same way:

    B_δ = B + δ·(tr B / n)·I,   L = chol(B_δ),   C = L⁻¹ A L⁻ᵀ,   C Y = Y Λ,   V = L⁻ᵀ Y,

so that A V = B_δ V Λ and Vᵀ B_δ V = I. Eigenvalues are returned in descending order and each
eigenvector column is signed so that its largest-magnitude entry is positive (deterministic
across runs and backends, up to exact ties).

Backends (`backend=` or the environment variable SST_JAX_GEVP_BACKEND; default "auto"):
- "lapack": each problem goes to LAPACK sygvd (Cholesky, sygst, syevd, back-substitution: what
  `scipy.linalg.eigh(a, b)` runs), in place on aligned work copies, in one host call for the
  whole batch (through `jax.pure_callback` inside jit). The problems are spread over worker
  threads ($SST_JAX_GEVP_THREADS, default: the CPUs this process may use), each LAPACK call on one
  BLAS thread (threadpoolctl), so a problem's bits do not depend on the batch, the workers or the
  core count; problems of n ≥ 2048 run one at a time on BLAS's own threads. What scipy adds per
  problem (two copies to Fortran order, finiteness passes, a Python wrapper holding the GIL) is
  replaced by batched numpy passes, a symmetry probe that skips the symmetrizing copy of inputs
  already symmetric, and outputs JAX takes over without a copy. "auto" picks it on the CPU
  backend, where XLA's batched reduction is slower than LAPACK.
- "reduction": the batched, jitted Cholesky reduction in XLA (two triangular solves,
  symmetrize, eigh), `precision=HIGHEST`; "auto" picks it on accelerators.
Both raise the same `NumericalError`s with the same messages, and agree to rounding.

Ill-conditioned and rank-deficient B. The reduction is as accurate as the Cholesky factor:
eigenvalue errors grow like cond(B_δ)·eps. `damping` δ bounds cond(B_δ) ≤ 1 + n/δ for any
positive semi-definite B, so a rank-deficient B (e.g. a Fisher from fewer samples than
dimensions) becomes positive definite and solvable. Without enough damping, B is rejected with
`NumericalError` (never NaNs) when its Cholesky factor fails (non-finite) or when it is
numerically singular: the smallest pivot squared is ≤ `rcond` times the largest. The default
(`default_rcond`) is n·eps of the dtype for an undamped B. A damped B_δ cannot be singular: its
pivots² lie in [λ_min, λ_max] and λ_min/λ_max ≥ δ/(n+δ), so where that floor is below n·eps the
default is half the floor (no lower than √n·eps, the typical rounding of a Cholesky pivot): a
ratio above it is the damping surviving rounding, one below it is a breakdown. (n·eps alone
rejected δ = 0.1 matrices of n ≈ 1500 with cond ≈ 6e3, far inside the conditioning warning
below.) The error names the batch index.

Below that hard limit the result can still be silently inaccurate: in float32 a damped B with
cond 1e6 gives eigenvalue errors of ~3e-3. We estimate the 1-norm condition number
κ₁(B_δ) = ‖B_δ‖₁‖B_δ⁻¹‖₁ (κ₂ ≤ κ₁ ≤ n·κ₂; typically κ₁ ≈ 3–7 κ₂): LAPACK ?pocon on the
Cholesky factor on the lapack path (O(n²), Hager–Higham estimator, within a small factor,
usually exact; skipped where the bound κ₁ ≤ ‖B_δ‖₁‖V‖₁‖V‖∞ is already far below the threshold), exactly from B_δ⁻¹ = V Vᵀ on the reduction path (one batched matmul); and
when κ₁·eps(dtype) > ILL_CONDITIONED_THRESHOLD = 5e-2 (float32: κ₁ > 4.2e5, about κ₂ > 1e5,
where eigenvalue errors reach ~1e-4·λmax; float64: κ₁ > 2e14), we warn once per call (`on_ill_conditioned="warn"`, absl logging), raise
`IllConditionedError` ("raise") or do nothing ("ignore"). float64 inputs while jax_enable_x64
is off are computed in float32 by JAX; that is warned about too.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sst_jax.errors import NumericalError

Backend = Literal["auto", "lapack", "reduction"]
OnIllConditioned = Literal["warn", "raise", "ignore"]
BACKEND_ENV = "SST_JAX_GEVP_BACKEND"
THREADS_ENV = "SST_JAX_GEVP_THREADS"
ILL_CONDITIONED_THRESHOLD = 5e-2
X64_ADVICE = ('compute in float64: call jax.config.update("jax_enable_x64", True) at program start (or set '
              'JAX_ENABLE_X64=1 in the environment) and pass float64 A and B')


class IllConditionedError(NumericalError):
    """B_δ is positive definite but so ill-conditioned that the working precision loses accuracy."""


def resolve_backend(backend: str | None = None, *arrays) -> str:
    """"lapack" or "reduction": `backend`, else $SST_JAX_GEVP_BACKEND, else "auto" (lapack on the
    CPU platform, i.e. where the inputs live or the default backend, reduction elsewhere)."""
    choice = backend or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if choice not in ("auto", "lapack", "reduction"):
        raise ValueError(f"eigensolver backend must be 'auto', 'lapack' or 'reduction', got {choice!r} "
                         f"(from {'backend=' if backend else '$' + BACKEND_ENV})")
    if choice != "auto":
        return choice
    platform = None
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                platform = next(iter(x.devices())).platform
                break
            except Exception:  # noqa: BLE001 - abstract or deleted arrays: fall back to the default
                pass
    return "lapack" if (platform or jax.default_backend()) == "cpu" else "reduction"


def _sym(x: jax.Array) -> jax.Array:
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def _damped(b: jax.Array, damping: float | jax.Array) -> jax.Array:
    n = b.shape[-1]
    mean_eig = jnp.trace(b, axis1=-2, axis2=-1) / n
    eye = jnp.eye(n, dtype=b.dtype)
    return b + (jnp.asarray(damping, b.dtype) * mean_eig)[..., None, None] * eye


def _pivot_signs(v, xp):
    """(..., k) signs making each column of v (..., n, k) have its largest-magnitude entry (the
    first, on ties) positive."""
    idx = xp.argmax(xp.abs(v), axis=-2)
    pivot = xp.take_along_axis(v, idx[..., None, :], axis=-2)[..., 0, :]
    return xp.where(pivot < 0, -1.0, 1.0).astype(v.dtype)


def _sign_fix(v, xp):
    return v * _pivot_signs(v, xp)[..., None, :]


# ----------------------------------------------------------------------------- reduction (XLA)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _reduce_and_solve(a: jax.Array, b: jax.Array, damping: jax.Array, top_k: int | None):
    with jax.default_matmul_precision("highest"):
        a, b = _sym(a), _sym(b)
        bd = _damped(b, damping)
        chol = jnp.linalg.cholesky(bd)
        # C = L⁻¹ A L⁻ᵀ: X = L⁻¹ A, then C = L⁻¹ Xᵀ (= L⁻¹ A L⁻ᵀ since A is symmetric).
        x = jax.lax.linalg.triangular_solve(chol, a, left_side=True, lower=True)
        c = jax.lax.linalg.triangular_solve(chol, jnp.swapaxes(x, -1, -2), left_side=True, lower=True)
        w, y = jnp.linalg.eigh(_sym(c))
        w, y = w[..., ::-1], y[..., ::-1]
        v = jax.lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)
        piv2 = jnp.square(jnp.diagonal(chol, axis1=-2, axis2=-1))
        finite = jnp.all(jnp.isfinite(chol), axis=(-2, -1)) & jnp.all(jnp.isfinite(piv2), axis=-1)
        ratio = jnp.min(piv2, axis=-1) / jnp.max(piv2, axis=-1)
        a_ok = jnp.all(jnp.isfinite(a), axis=(-2, -1))
        b_ok = jnp.all(jnp.isfinite(b), axis=(-2, -1))
        # Runs after the last LAPACK call (it needs the full V) and is one chain of dots.
        cond = _cond_estimate(bd, v, ratio, finite)
        if top_k is not None:
            w, v = w[..., :top_k], v[..., :top_k]
        v = _sign_fix(v, jnp)
    return w, v, finite, ratio, a_ok, b_ok, cond


def _cond_estimate(bd, v, ratio, finite):
    """κ₁(B_δ) = ‖B_δ‖₁·‖B_δ⁻¹‖₁ exactly, with B_δ⁻¹ = V Vᵀ (Vᵀ B_δ V = I, V the full basis): one
    batched matmul after the last LAPACK/eigh call (never concurrent with it). At least the
    pivot bound max ℓᵢᵢ²/min ℓᵢᵢ² ≤ κ₂ ≤ κ₁; inf where B_δ is not PD."""
    v = jnp.where(finite[..., None, None], v, jnp.zeros_like(v))
    inv = v @ jnp.swapaxes(v, -1, -2)
    est = _norm1(bd, jnp) * _norm1(inv, jnp)
    est = jnp.where(jnp.isfinite(est), est, jnp.inf)
    return jnp.where(finite, jnp.maximum(est, 1.0 / ratio), jnp.inf)


def _norm1(x, xp):
    return xp.max(xp.sum(xp.abs(x), axis=-2), axis=-1)


# ----------------------------------------------------------------------------- LAPACK (CPU)


_THREADED_BLAS_MIN_N = 2048  # from here one problem keeps BLAS's threads busy (8 × 1024²: 2 workers 1.26x faster)
_CHUNK_BYTES = 1 << 20  # work on ~1 MiB of matrices at a time: the vectorised steps stay in cache
_PROBE_MIN_ROW_BYTES = 512  # shorter rows: a transposed copy is cheaper than the symmetry probe
_PROBES: dict[int, np.ndarray] = {}
_XLA_TRANSPOSE_ROW_BYTES = 2048  # from this row length XLA's tiled transpose beats numpy's (3-4× at n=1024)


def _transposed_out(n: int, dtype) -> bool:
    """Whether the LAPACK path hands back Vᵀ (..., k, n) for XLA to transpose (long rows) rather
    than V (..., n, k) transposed by numpy."""
    return n * np.dtype(dtype).itemsize >= _XLA_TRANSPOSE_ROW_BYTES


def _lapack_solve(a: np.ndarray, b: np.ndarray, damping, top_k: int | None, exact_cond: bool = False,
                  transposed: bool = False):
    """The outputs of `_reduce_and_solve` from LAPACK sygvd per problem (numpy in, out); with
    `transposed` the eigenvectors come as Vᵀ (..., k, n), row i the i-th (see `_transposed_out`).

    Work buffers of one chunk (≤ 1 MiB in float64) are reused across chunks; the outputs are written in
    place, into 64-byte aligned buffers that JAX can take over without a copy (`_to_jax`)."""
    a = np.asarray(a)
    b = np.asarray(b, a.dtype)
    dtype = a.dtype
    batch, n = a.shape[:-2], a.shape[-1]
    af, bf = a.reshape((-1, n, n)), b.reshape((-1, n, n))
    m = af.shape[0]
    k = n if top_k is None else top_k
    w, v = _aligned_empty((m, k), dtype), _aligned_empty((m, k, n) if transposed else (m, n, k), dtype)
    finite, ratio, cond = np.zeros(m, bool), np.empty(m, dtype), np.empty(m, dtype)
    a_ok, b_ok = np.zeros(m, bool), np.zeros(m, bool)
    step = max(1, min(m, _CHUNK_BYTES // (n * n * 8)))
    # The symmetry probe runs in float64 (a float64 copy of a float32 chunk, made in cache).
    probe = n * dtype.itemsize >= _PROBE_MIN_ROW_BYTES
    outs = (w, v, finite, ratio, a_ok, b_ok, cond)

    def solve_range(rows: np.ndarray) -> None:  # one worker: its own buffers, chunks of its rows
        if not rows.size:
            return
        c = min(step, rows.size)
        work = (_matrix_stack(c, n, dtype), _matrix_stack(c, n, dtype), np.empty((c, n, n), dtype),
                np.empty((c, n, n)) if probe and dtype != np.float64 else None, _Lapack(dtype, n))
        for i in range(rows[0], rows[-1] + 1, c):
            s = slice(i, min(rows[-1] + 1, i + c))
            _lapack_chunk(af[s], bf[s], damping, k, exact_cond, work, tuple(x[s] for x in outs), transposed)

    # The problems are independent: below _THREADED_BLAS_MIN_N each LAPACK call runs on one BLAS
    # thread and W workers (threads: LAPACK runs without the GIL) take contiguous shares, so a batch
    # uses every core and a problem's arithmetic does not depend on the batch, the workers or the
    # machine's core count. Larger problems run one after another on BLAS's own threads.
    controller = _blas_controller()
    if controller is None or n >= _THREADED_BLAS_MIN_N:
        solve_range(np.arange(m))
    else:
        workers = max(1, min(_solver_threads(), m))
        with controller.limit(limits=1, user_api="blas"):
            if workers == 1:
                solve_range(np.arange(m))
            else:
                with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gevp") as pool:
                    list(pool.map(solve_range, np.array_split(np.arange(m), workers)))
    return (w.reshape(batch + (k,)), v.reshape(batch + ((k, n) if transposed else (n, k))), finite.reshape(batch),
            ratio.reshape(batch),
            a_ok.reshape(batch), b_ok.reshape(batch), cond.reshape(batch))


def _lapack_chunk(a: np.ndarray, b: np.ndarray, damping, k: int, exact_cond: bool, work, out,
                  transposed: bool = False) -> None:
    """`_lapack_solve` of one (c, n, n) chunk, into the chunk's slices `out` of the outputs."""
    dtype = a.dtype
    c, n = a.shape[0], a.shape[-1]
    w, v, finite, ratio, a_ok, b_ok, cond = out
    aw, bw, tmp = (x[:c] for x in work[:3])
    wide = None if work[3] is None else work[3][:c]
    lapack = work[4]
    # Symmetric C-contiguous work copies: the transpose view of each is Fortran order and equal to
    # it, so LAPACK works in place (no per-call copies); afterwards aw[j] holds Vᵀ (row i: the i-th
    # eigenvector, ascending) and bw[j] the Cholesky factor L (lower in the Fortran view).
    a_ok[:] = _symmetric_copy(a, aw, wide)
    b_ok[:] = _symmetric_copy(b, bw, wide)
    damping = np.asarray(damping, dtype)
    mean_eig = (np.trace(bw, axis1=-2, axis2=-1) / n).astype(dtype)
    if np.any(damping != 0):  # B_δ: add δ·tr/n to the diagonal only
        diag = np.lib.stride_tricks.as_strided(bw, (c, n), (bw.strides[0], bw.strides[1] + bw.strides[2]))
        diag += (damping * mean_eig)[:, None]  # a view: bw changes in place
    norms = np.abs(bw, out=tmp).sum(axis=-2).max(axis=-1)  # ‖B_δ‖₁
    finite[:] = False
    for j in np.flatnonzero(a_ok & b_ok & np.isfinite(mean_eig * damping)):
        # LAPACK sygvd (potrf, sygst, syevd, trsm: what scipy.linalg.eigh(a, b) runs), in place. info > n:
        # the leading minor of order info − n of B_δ is not PD; 0 < info ≤ n: syevd did not converge
        # (reported like a failed factorization).
        if lapack.sygvd(aw[j], bw[j]) == 0:
            finite[j] = True
            w[j] = lapack.eigenvalues[::-1][:k]
    # Descending order, top k and the sign convention (largest-magnitude entry positive). LAPACK's
    # eigenvectors are rows here (columns in Fortran order): V needs one transposed copy, made
    # here (strided) unless the output is Vᵀ (v of shape (c, k, n)), which XLA then transposes.
    rows = aw[:, ::-1][:, :k]
    sign = _row_signs(rows)
    if transposed:
        np.multiply(rows, sign, out=v)
    else:
        np.multiply(np.swapaxes(rows, -1, -2), np.swapaxes(sign, -1, -2), out=v)
    w[~finite], v[~finite] = np.nan, np.nan
    # κ₁(B_δ) ≤ U = ‖B_δ‖₁·√(max dᵢ)·Σ √dᵢ with d = diag(B_δ⁻¹) = Σⱼ Vᵢⱼ² (B_δ⁻¹ = V Vᵀ, the full V;
    # |Mᵢⱼ| ≤ √(MᵢᵢMⱼⱼ) for M ⪰ 0): where even U is below the ill-conditioning threshold, U stands as
    # the estimate; elsewhere (or when asked) LAPACK's ?pocon estimates κ₁ from the factor L that
    # sygvd left in bw (O(n²) per matrix).
    eps = float(np.finfo(dtype).eps)
    with np.errstate(over="ignore", invalid="ignore"):
        root = np.sqrt(np.einsum("cij,cij->cj", aw, aw).astype(np.float64))  # one read, no squared copy
        upper = norms.astype(np.float64) * root.max(axis=-1) * root.sum(axis=-1)
    est = np.where(finite, upper, np.inf)
    for j in np.flatnonzero(finite & (exact_cond | ~(upper * eps <= 0.5 * ILL_CONDITIONED_THRESHOLD))):
        rc = lapack.pocon(bw[j], norms[j])
        est[j] = 1.0 / rc if rc > 0 else np.inf
    piv2 = np.square(np.diagonal(bw, axis1=-2, axis2=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio[:] = np.where(finite, np.min(piv2, axis=-1) / np.max(piv2, axis=-1), np.nan)
        cond[:] = np.where(finite, np.maximum(est, 1.0 / ratio.astype(np.float64)), np.inf)


class _Lapack:
    """LAPACK ?sygvd and ?pocon on one worker's buffers, called through ctypes from scipy's
    `cython_lapack` (the LAPACK scipy.linalg.eigh itself runs): ctypes releases the GIL during
    the call, so workers run in parallel (scipy's f2py wrappers hold it), and the workspace is
    allocated once per worker. Each matrix is a C-contiguous (n, n) array that LAPACK reads as
    its Fortran transpose (the same symmetric matrix) and overwrites in place."""

    def __init__(self, dtype, n: int):
        self.dtype = np.dtype(dtype)
        sygvd, pocon = _lapack_routines("s" if self.dtype == np.float32 else "d")
        self._sygvd, self._pocon = sygvd, pocon
        # sygvd's minimum with eigenvectors (jobz = "V"); it covers pocon's 3n and n as well.
        lwork, liwork = 1 + 6 * n + 2 * n * n, 3 + 5 * n
        self.eigenvalues = np.empty(n, self.dtype)
        self._work = np.empty(lwork, self.dtype)
        self._iwork = np.empty(liwork, np.int32)
        # itype, n (= lda = ldb), lwork, liwork, info; jobz and uplo as one-byte strings.
        self._ints = (ctypes.c_int * 5)(1, n, lwork, liwork, 0)
        self._chars = ctypes.create_string_buffer(b"VL")
        self._scalars = np.zeros(2, self.dtype)  # anorm, rcond for pocon

    def _int(self, i: int) -> int:
        return ctypes.addressof(self._ints) + 4 * i

    def sygvd(self, a: np.ndarray, b: np.ndarray) -> int:
        """A v = λ B v in place (a ← eigenvectors as rows, ascending; b ← L); returns LAPACK's info."""
        chars, n = ctypes.addressof(self._chars), self._int(1)
        self._sygvd(self._int(0), chars, chars + 1, n, a.ctypes.data, n, b.ctypes.data, n,
                    self.eigenvalues.ctypes.data, self._work.ctypes.data, self._int(2), self._iwork.ctypes.data,
                    self._int(3), self._int(4))
        return self._ints[4]

    def pocon(self, factor: np.ndarray, anorm) -> float:
        """1 / κ₁ estimate of B from its Cholesky factor (`sygvd`'s b) and ‖B‖₁."""
        self._scalars[0] = anorm
        scalars, n = self._scalars.ctypes.data, self._int(1)
        self._pocon(ctypes.addressof(self._chars) + 1, n, factor.ctypes.data, n, scalars, scalars + self.dtype.itemsize,
                    self._work.ctypes.data, self._iwork.ctypes.data, self._int(4))
        return float(self._scalars[1])


@functools.cache
def _lapack_routines(prefix: str):
    """(?sygvd, ?pocon) from scipy.linalg.cython_lapack's function capsules, as ctypes functions."""
    import scipy.linalg.cython_lapack as cython_lapack

    pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer",
                                                                                      ctypes.pythonapi))
    name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))

    def routine(routine_name: str, arity: int):
        capsule = cython_lapack.__pyx_capi__[prefix + routine_name]
        return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * arity))(pointer(capsule, name(capsule)))

    return routine("sygvd", 14), routine("pocon", 9)


def _solver_threads() -> int:
    """Workers for a batch of LAPACK problems: $SST_JAX_GEVP_THREADS, else the CPUs this process may use."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive number of threads")
        return value
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (made after scipy's LAPACK is loaded), used
    to run each worker's LAPACK calls on one BLAS thread: W workers on W-thread BLAS oversubscribe
    the cores (measured 1.4-2.7x slower than one worker). None without threadpoolctl: one worker
    on BLAS's own threads."""
    _lapack_routines("d")
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.ThreadpoolController()


def _row_signs(rows: np.ndarray) -> np.ndarray:
    """(c, k, 1) signs making each row's largest-magnitude entry positive: `_sign_fix`'s rule
    from each row's max and min (two reads, no temporary); rows whose max and −min tie in
    magnitude go through `_pivot_signs` itself (first occurrence wins)."""
    hi, lo = rows.max(axis=-1, keepdims=True), rows.min(axis=-1, keepdims=True)
    sign = np.where(-lo > hi, -1.0, 1.0).astype(rows.dtype)
    tied = (-lo == hi)[..., 0]
    if tied.any():
        sign[tied, 0] = _pivot_signs(rows[tied].T, np)
    return sign


def _matrix_stack(count: int, n: int, dtype) -> np.ndarray:
    """A writable (count, n, n) array whose matrices are each C-contiguous and start on a 64-byte
    (cache-line) boundary, also for odd n in float32, where a stack packed end to end would not."""
    itemsize = np.dtype(dtype).itemsize
    stride = -(-n * n * itemsize // 64) * 64
    flat = _aligned_empty((count * stride // itemsize,), dtype)
    return np.lib.stride_tricks.as_strided(flat, (count, n, n), (stride, n * itemsize, itemsize))


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


_swap_last = jax.jit(lambda x: jnp.swapaxes(x, -1, -2))


def _to_jax(x: np.ndarray) -> jax.Array:
    """A jax.Array of a host result nobody else holds: zero-copy through DLPack where JAX can alias
    it (CPU, aligned, C-contiguous), else a copy."""
    if jax.default_backend() == "cpu" and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
        try:
            return jnp.from_dlpack(x)
        except (TypeError, ValueError, RuntimeError):  # a JAX that will not alias this buffer
            pass
    return jnp.asarray(x)


def _symmetric_copy(x: np.ndarray, out: np.ndarray, wide: np.ndarray | None) -> np.ndarray:
    """out ← (x + xᵀ)/2 for each matrix of the (c, n, n) chunk x; returns which matrices are finite.

    The transposed read is the costliest step outside LAPACK (strided; as slow as the copy to
    Fortran order that scipy makes of each input), so for rows of ≥ _PROBE_MIN_ROW_BYTES a matrix
    that is already symmetric is copied as it is, which gives the same bits ((x + x)/2 = x). The
    test: p = x u and q = xᵀu for a fixed pseudo-random u, in float64 (contiguous reads only). For
    symmetric x they differ by rounding only, |pᵢ − qᵢ| ≤ 2γₙ‖x‖_F‖u‖₂ ≤ n·eps₆₄‖x‖_F‖u‖₂; a matrix
    whose gap exceeds 4× that is symmetrized. So a matrix copied as it is has ‖(x − xᵀ)u‖∞ ≤
    4n·eps₆₄‖x‖_F‖u‖₂: asymmetric by O(n·eps₆₄) relative, below float32 resolution and at float64
    rounding level. A NaN/Inf entry makes p, q or ‖x‖_F non-finite; only then is each entry checked."""
    n = x.shape[-1]
    if n * x.dtype.itemsize < _PROBE_MIN_ROW_BYTES:
        np.add(x, np.swapaxes(x, -1, -2), out=out)
        out *= 0.5
        ok = np.isfinite(out.sum(axis=(-2, -1)))  # a NaN/Inf entry makes its matrix's sum non-finite
        for j in np.flatnonzero(~ok):
            ok[j] = np.isfinite(out[j]).all()  # or the sum overflowed
        return ok
    np.copyto(out, x)
    y = out if wide is None else wide
    if wide is not None:
        np.copyto(wide, x)
    u = _PROBES.get(n)
    if u is None:
        u = _PROBES[n] = np.random.default_rng(n).standard_normal(n)
    with np.errstate(over="ignore", invalid="ignore"):
        gap = np.abs(y @ u - u @ y).max(axis=-1)
        fro = np.sqrt([np.dot(m.ravel(), m.ravel()) for m in y])  # each matrix is contiguous: no copies
        tol = 4.0 * n * float(np.finfo(np.float64).eps) * float(np.linalg.norm(u)) * fro
    probed = np.isfinite(gap) & np.isfinite(tol)
    ok = probed.copy()
    for j in np.flatnonzero(~probed):
        ok[j] = np.isfinite(x[j]).all()  # a NaN/Inf entry, or finite entries that overflowed the probe
    for j in np.flatnonzero(ok & ~(probed & (gap <= tol))):
        np.add(x[j], x[j].T, out=out[j])
        out[j] *= 0.5
    return ok


def _lapack_traced(a, b, damping, top_k):
    dtype = a.dtype
    n, batch = a.shape[-1], a.shape[:-2]
    k = n if top_k is None else top_k
    transposed = _transposed_out(n, dtype)
    shapes = (jax.ShapeDtypeStruct(batch + (k,), dtype),
              jax.ShapeDtypeStruct(batch + ((k, n) if transposed else (n, k)), dtype),
              jax.ShapeDtypeStruct(batch, jnp.bool_), jax.ShapeDtypeStruct(batch, dtype),
              jax.ShapeDtypeStruct(batch, jnp.bool_), jax.ShapeDtypeStruct(batch, jnp.bool_),
              jax.ShapeDtypeStruct(batch, dtype))
    d = jnp.broadcast_to(jnp.asarray(damping, dtype), batch)

    def host(a_, b_, d_):
        if np.dtype(a_.dtype) != np.dtype(dtype):
            # jax hands the callback its operands through device_put, which follows the calling
            # thread's x64 setting: under the thread-local `jax.enable_x64()` context they arrive
            # already rounded to float32.
            raise RuntimeError(f"generalized_eigh_traced: the LAPACK callback received {a_.dtype} operands for a "
                               f"{np.dtype(dtype).name} problem; {X64_ADVICE} (the thread-local jax.enable_x64() "
                               "context does not reach the callback thread), or use backend='reduction'")
        return _lapack_solve_per_damping(np.asarray(a_), np.asarray(b_), np.asarray(d_), top_k, transposed)

    w, v, *rest = jax.pure_callback(host, shapes, a, b, d, vmap_method="broadcast_all")
    return (w, jnp.swapaxes(v, -1, -2) if transposed else v, *rest)


def _lapack_solve_per_damping(a, b, d, top_k, transposed=False):
    """_lapack_solve with a damping per batch entry (d has the batch shape)."""
    if d.ndim == 0 or np.all(d == d.reshape(-1)[0]):
        return _lapack_solve(a, b, d.reshape(-1)[0] if d.size else 0.0, top_k, transposed=transposed)
    outs = [_lapack_solve(a[i], b[i], d[i], top_k, transposed=transposed) for i in np.ndindex(d.shape)]
    return tuple(np.stack([o[j] for o in outs]).reshape(d.shape + outs[0][j].shape) for j in range(7))


# ----------------------------------------------------------------------------- API


def _input_dtype(x) -> np.dtype | None:
    dt = getattr(x, "dtype", None)
    if dt is None:
        dt = np.asarray(x).dtype
    return np.dtype(dt)


def default_rcond(n: int, dtype, damping: float = 0.0, damped_dim: int | None = None) -> float:
    """The singularity threshold on min/max pivot² for an n × n B_δ (module docstring): n·eps, or
    for δ > 0 half the exact floor δ/(d+δ) where that is lower, but not below √n·eps. d
    (`damped_dim`, default n) is the dimension the damping's trace is relative to: B_δ = B + δ·(tr B/d)·I
    (a row-space problem of size n < d keeps the floor of the full d-dimensional one)."""
    eps = float(jnp.finfo(dtype).eps)
    tol = n * eps
    if damping > 0:
        d = n if damped_dim is None else damped_dim
        tol = min(tol, max(0.5 * damping / (d + damping), float(np.sqrt(n)) * eps))
    return tol


def generalized_eigh(a: jax.Array, b: jax.Array, *, damping: float = 0.0,
                     top_k: int | None = None, rcond: float | None = None,
                     name: str = "B", backend: Backend | None = None,
                     on_ill_conditioned: OnIllConditioned = "warn") -> tuple[jax.Array, jax.Array]:
    """Solve A v = λ B_δ v for symmetric A and SPD B, batched over leading axes.

    Args:
      a, b: (..., n, n) symmetric matrices (only their symmetric parts are used).
      damping: δ; B_δ = B + δ·(tr B / n)·I (trace-relative, so δ is scale-free).
      top_k: keep only the k largest eigenpairs.
      rcond: reject B_δ whose smallest Cholesky pivot² ≤ rcond × largest (default `default_rcond`:
        n·eps, relaxed to the floor damping guarantees).
      name: what B is, for error messages (e.g. "F_b").
      backend: "lapack", "reduction" or "auto" (default: $SST_JAX_GEVP_BACKEND, else "auto":
        LAPACK on CPU, the XLA reduction on accelerators). Same results and errors on both.
      on_ill_conditioned: when the estimated cond(B_δ)·eps(dtype) > ILL_CONDITIONED_THRESHOLD:
        "warn" (default; one absl warning per call), "raise" (IllConditionedError) or "ignore".
    Returns:
      (eigvals (..., k) descending, eigvecs (..., n, k)) with Vᵀ B_δ V = I, A V = B_δ V Λ.
    Raises:
      NumericalError: non-finite inputs, or B_δ not positive definite at working precision.
      IllConditionedError: with on_ill_conditioned="raise" (a NumericalError).
    """
    if on_ill_conditioned not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_ill_conditioned must be 'warn', 'raise' or 'ignore', got {on_ill_conditioned!r}")
    in_dtypes = (_input_dtype(a), _input_dtype(b))
    path = resolve_backend(backend, a, b)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"generalized_eigh needs square A and B of equal shape; got {a.shape}, {b.shape}")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    if any(dt == np.float64 for dt in in_dtypes) and dtype != jnp.float64:
        logging.warning("generalized_eigh(%s): float64 input is computed in float32 because jax_enable_x64 is "
                        "off; to keep float64, %s.", name, X64_ADVICE)
    a, b = a.astype(dtype), b.astype(dtype)
    n = a.shape[-1]
    if top_k is not None and not 0 < top_k <= n:
        raise ValueError(f"top_k={top_k} must be in 1..{n}")
    if path == "lapack":
        transposed = _transposed_out(n, dtype)
        w, v, finite, ratio, a_ok, b_ok, cond = _lapack_solve(np.asarray(a), np.asarray(b), damping, top_k,
                                                              transposed=transposed)
        w, v = _to_jax(w), (_swap_last(_to_jax(v)) if transposed else _to_jax(v))
    else:
        # One dispatch and one host transfer: the input checks run inside the jitted solve.
        w, v, finite, ratio, a_ok, b_ok, cond = _reduce_and_solve(a, b, jnp.asarray(damping, dtype), top_k)
        finite, ratio, a_ok, b_ok, cond = jax.device_get((finite, ratio, a_ok, b_ok, cond))
    for label, ok in (("A", a_ok), (name, b_ok)):
        bad = ~np.asarray(ok)
        if bad.any():
            raise NumericalError(f"{label} has NaN/Inf entries at batch index {_first(bad)}")
    eps = float(jnp.finfo(dtype).eps)
    tol = default_rcond(n, dtype, damping) if rcond is None else rcond
    finite, ratio = np.asarray(finite), np.asarray(ratio)
    bad = ~(finite & (ratio > tol))
    if bad.any():
        i = _first(bad)
        r = ratio[i]
        raise NumericalError(
            f"{_described(name, damping)} is not positive definite at working precision "
            f"{'at batch index ' + str(i) if i else '(unbatched)'} (Cholesky {'failed' if not finite[i] else 'succeeded'}, "
            f"min/max pivot² = {float(r):.3g} ≤ rcond {tol:.3g}); increase damping or use float64")
    if on_ill_conditioned != "ignore":
        _check_conditioning(np.asarray(cond, np.float64), eps, dtype, damping, name, on_ill_conditioned)
    return w, v


def _described(name: str, damping) -> str:
    return f"{name} (+ damping {damping}·tr/n·I)" if damping else name


def _check_conditioning(cond: np.ndarray, eps: float, dtype, damping, name: str, action: str) -> None:
    score = cond * eps
    ill = score > ILL_CONDITIONED_THRESHOLD
    if not ill.any():
        return
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(score)), score.shape)) if score.ndim else ()
    where = f"at batch index {worst}" if worst else "(unbatched)"
    fix = ("increase damping" if jnp.dtype(dtype) == jnp.float64
           else f"{X64_ADVICE}, or increase damping (δ bounds cond ≤ 1 + n/δ)")
    msg = (f"{_described(name, damping)} is ill-conditioned in {jnp.dtype(dtype).name}: estimated "
           f"cond ≈ {float(cond[worst]):.3g} {where} ({int(ill.sum())} of {ill.size} problems with "
           f"cond·eps > {ILL_CONDITIONED_THRESHOLD:g}); eigenvalues may carry relative errors up to "
           f"~{float(score[worst]):.1g}·(λ scale). To fix: {fix}.")
    if action == "raise":
        raise IllConditionedError(msg)
    logging.warning("generalized_eigh: %s", msg)


def generalized_eigh_traced(a: jax.Array, b: jax.Array, *, damping: float | jax.Array = 0.0,
                            top_k: int | None = None, rcond: float | None = None,
                            backend: Backend | None = None):
    """`generalized_eigh` usable inside jit: returns (eigvals, eigvecs, ok) where ok (...) is
    False where B_δ is not PD at working precision (those entries are NaN or meaningless). The
    backend is chosen as in `generalized_eigh` (LAPACK through `jax.pure_callback` on CPU). No
    conditioning warning is issued here (use `condition_estimate` on the host)."""
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    n = a.shape[-1]
    a, b = a.astype(dtype), b.astype(dtype)
    if resolve_backend(backend, a, b) == "lapack":
        w, v, finite, ratio, _, _, _ = _lapack_traced(a, b, damping, top_k)
    else:
        w, v, finite, ratio, _, _, _ = _reduce_and_solve(a, b, jnp.asarray(damping, dtype), top_k)
    if rcond is None:  # a traced damping gives no floor to rely on: the undamped rule
        rcond = default_rcond(n, dtype, damping if isinstance(damping, (int, float)) else 0.0)
    return w, v, finite & (ratio > rcond)


def condition_estimate(b: jax.Array, *, damping: float = 0.0, backend: Backend | None = None) -> np.ndarray:
    """κ₁(B_δ) as the ill-conditioning check estimates it (lapack: ?pocon, a lower-bound estimate;
    reduction: exact), batched over leading axes; inf where B_δ is not PD."""
    b = jnp.asarray(b)
    dtype = jnp.result_type(b.dtype, jnp.float32)
    b = b.astype(dtype)
    z = jnp.zeros_like(b)
    if resolve_backend(backend, b) == "lapack":
        out = _lapack_solve(np.asarray(z), np.asarray(b), damping, 1, exact_cond=True)
    else:
        out = jax.device_get(_reduce_and_solve(z, b, jnp.asarray(damping, dtype), 1))
    return np.asarray(out[-1])


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True entry of a (possibly 0-d) mask, as a tuple."""
    if mask.ndim == 0:
        return ()
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_positive_definite(b: jax.Array, *, damping: float = 0.0, rcond: float | None = None,
                            name: str = "B", backend: Backend | None = None) -> None:
    """Raise NumericalError (naming the batch index) unless B + δ·tr/n·I is PD at working precision."""
    b = jnp.asarray(b)
    generalized_eigh(jnp.zeros_like(b), b, damping=damping, top_k=1, rcond=rcond, name=name, backend=backend,
                     on_ill_conditioned="ignore")
