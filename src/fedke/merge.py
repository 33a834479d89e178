"""Server-side merges of client edits: the CollabEdit closed form and task-arithmetic merges.

Pure functions, arrays in and arrays out (NumPy + SciPy only). Conventions follow
:mod:`fedke.payload`: a layer ``W`` is ``(d_out, d_in)`` with ``v = W k``; keys ``K`` are
``(d_in, M)``, residuals ``R`` are ``(d_out, M)``, ``A0 = lam * C`` is the ``(d_in, d_in)``
regulariser. Everything is accumulated in float64; every linear solve goes through
:func:`solve_right` (Cholesky, never an explicit inverse, never a fallback: a matrix that is not
symmetric positive definite or is numerically singular raises :class:`SingularSystemError`).

Equations (NOTES.md section 1, CollabEdit paper numbering):

* MEMIT / Global-Edit:  ``Delta = R K^T (A0 + K K^T)^-1``
* CollabEdit, Lemma 1 (eq. 4):
  ``Delta_G = sum_i Delta_i (A0 + K_i K_i^T) (A0 + sum_j K_j K_j^T)^-1``
* Residual after repeating an edit (eq. 6): ``R_new = R - R K^T (A0 + K K^T)^-1 K``
* AlphaEdit (Fang et al., ICLR 2025): ``Delta = R K^T P (P (K K^T + C_p) P + alpha I)^-1`` with
  ``P`` the projector onto the near-null space of ``C0`` (:func:`null_space_projector`). It is
  MEMIT's closed form in projected keys ``K' = P K`` with ``A0 = alpha I`` and ``C_p`` the earlier
  rounds' ``sum K' K'^T`` (:func:`alphaedit_update`), so CollabEdit merges it exactly.
* Task arithmetic / FedAvg / TIES: :func:`merge_deltas`.

Why one file of about 550 lines: it is one job, the server's maths, kept where a reader checks
every closed form against the equations above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import scipy.linalg

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "alphaedit_update",
    "null_space_projector",
    "relative_update_error",
    "SingularSystemError",
    "collab_edit",
    "collab_edit_from_sums",
    "collab_sums",
    "get_merge_method",
    "global_edit",
    "merge_deltas",
    "residual_after_repeat",
    "rkt_from_delta",
    "rcond_threshold",
    "simple_average",
    "solve_right",
    "spd_factor",
    "task_arithmetic",
    "ties",
    "trim_threshold",
]

# ----------------------------------------------------------------------------- shape checks


def _as_float64(name: str, array: np.ndarray, ndim: int) -> np.ndarray:
    """``array`` as a float64 ndarray of ``ndim`` dimensions, or a ValueError naming ``name``."""
    out = np.asarray(array)
    if out.dtype == object or not (np.issubdtype(out.dtype, np.floating) or np.issubdtype(out.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {out.dtype}")
    if out.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {out.shape}")
    return out.astype(np.float64, copy=False)


def _check_square(name: str, matrix: np.ndarray, n: int | None = None) -> None:
    rows, cols = matrix.shape
    if rows != cols:
        raise ValueError(f"{name} must be square (d_in, d_in), got shape {matrix.shape}")
    if n is not None and rows != n:
        raise ValueError(f"{name} must be ({n}, {n}) to match d_in={n}, got shape {matrix.shape}")


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")


# ----------------------------------------------------------------------------- the one solve


class SingularSystemError(np.linalg.LinAlgError):
    """A linear system of the merge is not (numerically) symmetric positive definite.

    Raised instead of any fallback: the message names the matrix (and the layer, when the caller
    gives it) and says whether Cholesky failed or the reciprocal condition number is too small.
    A subclass of :class:`numpy.linalg.LinAlgError` (hence of ``ValueError``).
    """


def rcond_threshold(n: int) -> float:
    """The smallest reciprocal 1-norm condition number a solve of order ``n`` accepts: ``n * eps``.

    Below it the forward-error bound of a float64 Cholesky solve, about ``n * eps * cond``,
    exceeds 1: the solution may have no correct digit, so the matrix is treated as singular.
    """
    return max(1, int(n)) * float(np.finfo(np.float64).eps)


def spd_factor(matrix: np.ndarray, what: str = "gram", *, overwrite: bool = False) -> tuple[np.ndarray, bool]:
    """The Cholesky factor of the symmetric ``matrix`` (``scipy.linalg.cho_factor`` form), checked.

    Raises :class:`SingularSystemError` naming ``what`` when ``matrix`` is not finite, when
    Cholesky fails (not positive definite, or exactly singular) or when the LAPACK estimate of its
    reciprocal 1-norm condition number (``dpocon``) is below :func:`rcond_threshold` (nearly
    singular: a solve would return noise). Only the upper triangle is read. ``overwrite=True``
    lets the factorisation reuse ``matrix``'s memory (float64, C- or F-contiguous input).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if not np.isfinite(matrix).all():
        raise SingularSystemError(f"{what} has non-finite values")
    anorm = float(np.abs(matrix).sum(axis=0).max()) if n else 0.0
    try:
        factor = scipy.linalg.cho_factor(matrix, lower=False, overwrite_a=overwrite, check_finite=False)
    except np.linalg.LinAlgError as error:
        raise SingularSystemError(
            f"{what} is not positive definite (Cholesky failed: {error}); it must be symmetric positive "
            f"definite (A = lam C positive definite, every K K^T positive semi-definite)"
        ) from None
    if n:
        rcond, info = scipy.linalg.lapack.dpocon(factor[0], anorm, uplo="U")
        if info != 0 or not rcond >= rcond_threshold(n):
            raise SingularSystemError(
                f"{what} is numerically singular: reciprocal condition number {float(rcond):.3g} below "
                f"{rcond_threshold(n):.3g} (n eps); a solve would return noise"
            )
    return factor


def _factorise(gram: np.ndarray, what: str = "gram") -> Callable[[np.ndarray], np.ndarray]:
    """A function ``rhs -> X`` with ``X @ gram = rhs`` for the symmetric positive definite ``gram``.

    Factorised once by Cholesky (:func:`spd_factor`); a ``gram`` that is not positive definite or
    is numerically singular raises :class:`SingularSystemError`: there is no fallback (a
    least-squares or indefinite solve of ``A0 + K K^T`` would hide a wrong regulariser or a bad
    payload). Never forms an inverse.
    """
    factor = spd_factor(gram, what)
    # X gram = rhs  <=>  gram X^T = rhs^T  (gram symmetric)
    return lambda rhs: scipy.linalg.cho_solve(factor, rhs.T, check_finite=False).T


def solve_right(rhs: np.ndarray, gram: np.ndarray, *, what: str = "gram") -> np.ndarray:
    """``X`` with ``X @ gram = rhs``, i.e. ``X = rhs gram^-1`` for symmetric positive definite ``gram``.

    ``rhs`` is ``(d_out, d_in)``, ``gram`` is ``(d_in, d_in)``. Solved as ``gram X^T = rhs^T`` by
    Cholesky in float64. A ``gram`` that is not positive definite, or whose reciprocal condition
    number is below ``d_in * eps``, raises :class:`SingularSystemError` naming ``what`` (no
    fallback, no inverse).
    """
    rhs = _as_float64("rhs", rhs, 2)
    gram = _as_float64("gram", gram, 2)
    _check_square("gram", gram, rhs.shape[1])
    return _factorise(gram, what)(rhs)


# ----------------------------------------------------------------------------- closed forms


def _check_keys(residuals: np.ndarray, keys: np.ndarray, regulariser: np.ndarray) -> tuple[np.ndarray, ...]:
    residuals = _as_float64("residuals", residuals, 2)
    keys = _as_float64("keys", keys, 2)
    regulariser = _as_float64("regulariser", regulariser, 2)
    if residuals.shape[1] != keys.shape[1]:
        raise ValueError(
            f"residuals (d_out, M) and keys (d_in, M) must have the same number of columns M; "
            f"got residuals {residuals.shape} and keys {keys.shape}"
        )
    _check_square("regulariser", regulariser, keys.shape[0])
    return residuals, keys, regulariser


def global_edit(residuals: np.ndarray, keys: np.ndarray, regulariser: np.ndarray) -> np.ndarray:
    """Global-Edit / MEMIT closed form ``Delta = R K^T (A0 + K K^T)^-1`` (NOTES.md section 1).

    ``residuals`` R is ``(d_out, M)``, ``keys`` K is ``(d_in, M)``, ``regulariser`` A0 = lam*C is
    ``(d_in, d_in)``. Returns the ``(d_out, d_in)`` update.
    """
    residuals, keys, regulariser = _check_keys(residuals, keys, regulariser)
    return solve_right(residuals @ keys.T, regulariser + keys @ keys.T)


def rkt_from_delta(delta: np.ndarray, kkt: np.ndarray, regulariser: np.ndarray) -> np.ndarray:
    """``R_i K_i^T = Delta_i (A0 + K_i K_i^T)``: a client's term of CollabEdit eq. 4."""
    delta = _as_float64("delta", delta, 2)
    kkt = _as_float64("kkt", kkt, 2)
    regulariser = _as_float64("regulariser", regulariser, 2)
    _check_square("kkt", kkt, delta.shape[1])
    _check_square("regulariser", regulariser, delta.shape[1])
    return delta @ regulariser + delta @ kkt


def collab_sums(
    deltas: Iterable[np.ndarray], kkts: Iterable[np.ndarray], regulariser: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The two sums of CollabEdit eq. 4 from per-client payloads, streamed one client at a time.

    Returns ``S = sum_i Delta_i (A0 + K_i K_i^T)`` (= ``sum_i R_i K_i^T``) and
    ``G = sum_i K_i K_i^T``. Computed as ``S = (sum_i Delta_i) A0 + sum_i Delta_i K_i K_i^T``:
    N products with the ``kkt``\\ s plus one with ``A0``, no solve. ``deltas`` and ``kkts`` may be
    generators; only the running sums are held.
    """
    regulariser = _as_float64("regulariser", regulariser, 2)
    _check_square("regulariser", regulariser)
    d_in = regulariser.shape[0]
    if isinstance(deltas, Sequence) and isinstance(kkts, Sequence) and len(deltas) != len(kkts):
        raise ValueError(f"deltas and kkts must have one entry per client; got {len(deltas)} deltas and {len(kkts)} kkts")

    delta_sum: np.ndarray | None = None
    products = None
    kkt_sum = np.zeros((d_in, d_in))
    try:
        for index, (delta, kkt) in enumerate(zip(deltas, kkts, strict=True)):
            delta = _as_float64(f"deltas[{index}]", delta, 2)
            kkt = _as_float64(f"kkts[{index}]", kkt, 2)
            if delta.shape[1] != d_in:
                raise ValueError(f"deltas[{index}] must be (d_out, {d_in}) to match the regulariser, got {delta.shape}")
            _check_square(f"kkts[{index}]", kkt, d_in)
            if delta_sum is None:
                delta_sum = delta.copy()
                products = delta @ kkt
            else:
                _check_shape(f"deltas[{index}]", delta, delta_sum.shape)
                delta_sum += delta
                products += delta @ kkt
            kkt_sum += kkt
    except ValueError as error:
        if "zip()" in str(error):
            raise ValueError("deltas and kkts must have one entry per client (different lengths)") from error
        raise
    if delta_sum is None:
        raise ValueError("deltas is empty: need at least one client")
    return delta_sum @ regulariser + products, kkt_sum


def collab_edit_from_sums(rkt_sum: np.ndarray, kkt_sum: np.ndarray, regulariser: np.ndarray, *,
                          what: str = "A0 + G") -> np.ndarray:
    """CollabEdit from the two sums: ``Delta_G = S (A0 + G)^-1`` (Lemma 1 with ``Delta_i (A0 + K_iK_i^T) = R_iK_i^T``).

    ``rkt_sum`` S = sum_i R_i K_i^T ``(d_out, d_in)``; ``kkt_sum`` G = sum_i K_i K_i^T ``(d_in, d_in)``.
    These sums are what secure aggregation gives the server. ``A0 + G`` must be symmetric positive
    definite and not numerically singular, else :class:`SingularSystemError` naming ``what`` (e.g.
    ``"layer 'h.1' A_t + sum K K^T"``).
    """
    rkt_sum = _as_float64("rkt_sum", rkt_sum, 2)
    kkt_sum = _as_float64("kkt_sum", kkt_sum, 2)
    regulariser = _as_float64("regulariser", regulariser, 2)
    _check_square("kkt_sum", kkt_sum, rkt_sum.shape[1])
    _check_square("regulariser", regulariser, rkt_sum.shape[1])
    return solve_right(rkt_sum, regulariser + kkt_sum, what=what)


def collab_edit(
    deltas: Sequence[np.ndarray] | Iterable[np.ndarray],
    kkts: Sequence[np.ndarray] | Iterable[np.ndarray],
    regulariser: np.ndarray,
) -> np.ndarray:
    """CollabEdit, Lemma 1 (eq. 4): ``Delta_G = sum_i Delta_i (A0 + K_iK_i^T) (A0 + sum_j K_jK_j^T)^-1``.

    One solve in total; the per-client cost is one ``(d_out, d_in) x (d_in, d_in)`` product
    (:func:`collab_sums`). When clients send ``R_i K_i^T`` as well, prefer
    :func:`collab_edit_from_sums`, which needs only additions before the solve.
    """
    rkt_sum, kkt_sum = collab_sums(deltas, kkts, regulariser)
    return collab_edit_from_sums(rkt_sum, kkt_sum, regulariser)


def null_space_projector(covariance: np.ndarray, threshold: float) -> np.ndarray:
    """AlphaEdit's ``P = U_0 U_0^T``: the projector onto the eigenvectors of ``covariance`` (C0, the
    keys' second moment) whose eigenvalues are below ``threshold`` times the mean eigenvalue.

    An update ``Delta = Delta P`` leaves every key in the span of C0's large directions (the model's
    existing knowledge) unchanged: ``Delta k = Delta P k ~ 0``. The threshold is relative, so it does
    not depend on the keys' scale (the authors use an absolute 1e-2 on their models' C0). ValueError
    when no eigenvalue is below it (an empty null space cannot hold an edit).
    """
    covariance = _as_float64("covariance", covariance, 2)
    _check_square("covariance", covariance)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    eigenvalues, vectors = np.linalg.eigh(0.5 * (covariance + covariance.T))
    kept = vectors[:, eigenvalues < threshold * float(eigenvalues.mean())]
    if kept.shape[1] == 0:
        raise ValueError(f"no eigenvalue of the covariance is below {threshold} x its mean "
                         f"({float(eigenvalues.mean()):.4g}; smallest {float(eigenvalues.min()):.4g}): "
                         "raise the null-space threshold")
    return kept @ kept.T


def alphaedit_update(residuals: np.ndarray, keys: np.ndarray, projector: np.ndarray, alpha: float,
                     preserved: np.ndarray | None = None) -> np.ndarray:
    """AlphaEdit's closed form, as its authors compute it:
    ``Delta^T = (P (K K^T + C_p) + alpha I)^-1 P K R^T`` (``C_p``: ``preserved``, the earlier edits'
    ``K K^T``), by a general linear solve; a reference for :func:`global_edit` on projected keys,
    which is the same update (``X = X P`` since ``X = (R K^T - X M) P / alpha``)."""
    residuals, keys, projector = _check_keys(residuals, keys, projector)
    d_in = keys.shape[0]
    gram = keys @ keys.T + (0.0 if preserved is None else _as_float64("preserved", preserved, 2))
    system = projector @ gram + alpha * np.eye(d_in)
    return scipy.linalg.solve(system, projector @ keys @ residuals.T).T


def relative_update_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """``||got - want||_F / ||want||_F`` over all layers of ``want`` together (e.g. CollabEdit's
    merged update against Global-Edit's)."""
    num = sum(float(np.sum((np.asarray(got[name], dtype=np.float64) - want[name]) ** 2)) for name in want)
    den = sum(float(np.sum(np.asarray(want[name], dtype=np.float64) ** 2)) for name in want)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def residual_after_repeat(
    residuals: np.ndarray,
    keys: np.ndarray,
    regulariser: np.ndarray,
    repeats: int,
    *,
    per_request: bool = False,
) -> np.ndarray:
    """Residual norms as the same edit is applied again and again (CollabEdit eq. 6).

    ``R_new = R_old - R_old K^T (A0 + K K^T)^-1 K``, repeated ``repeats`` times (one Cholesky
    factorisation reused). Returns ``norms`` of length ``repeats + 1``: ``norms[0] = ||R||_F``
    before any edit, ``norms[t]`` after ``t`` edits; with ``per_request=True`` an array
    ``(repeats + 1, M)`` of column norms ``||r_j||``. The Frobenius norm never increases for
    positive definite ``A0`` (``R_new = R (I - P)`` with ``P = K^T (A0 + K K^T)^-1 K`` symmetric,
    eigenvalues in ``[0, 1)``); a single request's norm need not fall at every repeat.
    """
    residuals, keys, regulariser = _check_keys(residuals, keys, regulariser)
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 0:
        raise ValueError(f"repeats must be a non-negative integer, got {repeats!r}")
    solve = _factorise(regulariser + keys @ keys.T)

    def norm(r: np.ndarray) -> np.ndarray:
        return np.linalg.norm(r, axis=0) if per_request else np.asarray(np.linalg.norm(r))

    norms = [norm(residuals)]
    current = residuals
    for _ in range(int(repeats)):
        current = current - solve(current @ keys.T) @ keys
        norms.append(norm(current))
    return np.stack(norms)


# ----------------------------------------------------------------------------- task-arithmetic merges


@dataclass(frozen=True)
class MergeMethod:
    """A named generalised task-arithmetic merge (mergekit style): options, not a code copy.

    Parameters
    ----------
    name : str
        The registry name.
    consensus : bool
        Elect a sign per entry by the sign of the summed (weighted, trimmed) deltas and keep only
        the entries agreeing with it (TIES).
    normalisation : str
        ``"sum"`` (task arithmetic), ``"mean"`` (divide by the sum of weights: FedAvg) or
        ``"disjoint_mean"`` (divide each entry by the weight of the clients that contributed to it:
        TIES).
    default_density : float
        Fraction of entries kept per client when the caller gives none (1.0: no trimming).
    default_scale : float
        The lambda applied to the merged delta when the caller gives none.
    """

    name: str
    consensus: bool
    normalisation: str
    default_density: float = 1.0
    default_scale: float = 1.0

    def __call__(
        self,
        deltas: Sequence[np.ndarray],
        *,
        weights: Sequence[float] | np.ndarray | None = None,
        scale: float | None = None,
        density: float | None = None,
    ) -> np.ndarray:
        """Merge with this method; ``scale`` / ``density`` left as None take the method's defaults."""
        return merge_deltas(
            deltas,
            method=self,
            weights=weights,
            scale=self.default_scale if scale is None else scale,
            density=self.default_density if density is None else density,
        )


_NORMALISATIONS = ("sum", "mean", "disjoint_mean")

MERGE_METHODS: Mapping[str, MergeMethod] = {
    "fedavg": MergeMethod("fedavg", consensus=False, normalisation="mean"),
    "simple_average": MergeMethod("simple_average", consensus=False, normalisation="mean"),
    "task_arithmetic": MergeMethod("task_arithmetic", consensus=False, normalisation="sum"),
    "ties": MergeMethod("ties", consensus=True, normalisation="disjoint_mean", default_density=0.2),
}


def get_merge_method(name: str | MergeMethod) -> MergeMethod:
    """The :class:`MergeMethod` registered as ``name`` (case-insensitive, ``-`` same as ``_``)."""
    if isinstance(name, MergeMethod):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[key]


def _kept_count(density: float, size: int) -> int:
    """``k = round(density * size)`` (half up), at least 1."""
    return max(1, min(size, int(math.floor(density * size + 0.5))))


def trim_threshold(delta: np.ndarray, density: float) -> float:
    """The magnitude threshold keeping the top ``density`` fraction of ``delta``'s entries (TIES trim).

    ``k = round(density * delta.size)`` (at least 1); the threshold is the k-th largest ``|value|``.
    Entries with ``|value| >= threshold`` are kept, so entries tying at the threshold are all kept
    (as in the TIES authors' code): deterministic and independent of entry order, at the cost of
    occasionally keeping more than k entries. ``density >= 1`` keeps everything (threshold 0).
    """
    if density >= 1.0:
        return 0.0
    magnitudes = np.abs(delta).ravel()
    k = _kept_count(density, magnitudes.size)
    return float(np.partition(magnitudes, magnitudes.size - k)[magnitudes.size - k])


def _trimmed(delta: np.ndarray, threshold: float) -> np.ndarray:
    if threshold <= 0.0:
        return delta
    return np.where(np.abs(delta) >= threshold, delta, 0.0)


def _check_weights(weights: Sequence[float] | np.ndarray | None, n: int, normalisation: str) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have one entry per delta ({n}), got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
    if normalisation != "sum" and weights.sum() <= 0:
        raise ValueError("weights must not all be zero")
    return weights


def _check_deltas(deltas: Sequence[np.ndarray]) -> tuple[int, ...]:
    if len(deltas) == 0:
        raise ValueError("deltas is empty: need at least one client")
    shape = np.shape(deltas[0])
    for index in range(len(deltas)):
        if np.shape(deltas[index]) != shape:
            raise ValueError(f"deltas[{index}] has shape {np.shape(deltas[index])}, expected {shape} like deltas[0]")
    return shape


def merge_deltas(
    deltas: Sequence[np.ndarray] | Iterable[np.ndarray],
    *,
    method: str | MergeMethod,
    weights: Sequence[float] | np.ndarray | None = None,
    scale: float = 1.0,
    density: float = 1.0,
) -> np.ndarray:
    """Generalised task-arithmetic merge: trim, (elect signs), combine, scale (TIES paper, mergekit).

    For client deltas ``D_i`` with weights ``w_i`` (default 1):

    1. trim: ``T_i = D_i`` where ``|D_i| >= t_i`` else 0, ``t_i`` keeping the top ``density``
       fraction of ``D_i`` (:func:`trim_threshold`; ``density=1`` keeps all);
    2. consensus (TIES): ``s = sign(sum_i w_i T_i)`` per entry; client ``i`` contributes to an
       entry only where ``T_i != 0`` and ``sign(T_i) = s`` (where the sum is exactly 0, ``s = 0``
       and the entry merges to 0);
    3. normalisation: ``"sum"``: ``sum_i w_i T_i``; ``"mean"``: ``sum_i w_i T_i / sum_i w_i``;
       ``"disjoint_mean"``: ``sum_{i agreeing} w_i T_i / sum_{i agreeing} w_i`` per entry
       (0 where no client agrees);
    4. result times ``scale``.

    ``method`` is a name from :data:`MERGE_METHODS` or a :class:`MergeMethod`; ``density`` and
    ``scale`` are taken as given here (the named wrappers carry the methods' defaults).
    With consensus the deltas are read twice (one per-client threshold is kept, never N trimmed
    copies), so pass a sequence; an iterator is materialised first.
    """
    spec = get_merge_method(method)
    if spec.normalisation not in _NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {_NORMALISATIONS}, got {spec.normalisation!r}")
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if not isinstance(deltas, Sequence) or isinstance(deltas, (str, bytes)):
        deltas = list(deltas)
    shape = _check_deltas(deltas)
    weights = _check_weights(weights, len(deltas), spec.normalisation)

    def client(index: int) -> np.ndarray:
        return _as_float64(f"deltas[{index}]", deltas[index], len(shape))

    thresholds = [0.0] * len(deltas)
    if spec.consensus:
        signed_total = np.zeros(shape)
        for index in range(len(deltas)):
            delta = client(index)
            thresholds[index] = trim_threshold(delta, density)
            signed_total += weights[index] * _trimmed(delta, thresholds[index])
        elected = np.sign(signed_total)
        del signed_total

    total = np.zeros(shape)
    contributing_weight = np.zeros(shape) if spec.normalisation == "disjoint_mean" else None
    for index in range(len(deltas)):
        delta = client(index)
        if not spec.consensus:
            thresholds[index] = trim_threshold(delta, density)
        trimmed = _trimmed(delta, thresholds[index])
        if spec.consensus:
            agrees = (np.sign(trimmed) == elected) & (trimmed != 0)
            trimmed = np.where(agrees, trimmed, 0.0)
        else:
            agrees = trimmed != 0
        total += weights[index] * trimmed
        if contributing_weight is not None:
            contributing_weight += weights[index] * agrees

    if spec.normalisation == "mean":
        total /= weights.sum()
    elif spec.normalisation == "disjoint_mean":
        np.divide(total, contributing_weight, out=total, where=contributing_weight > 0)
        total[contributing_weight <= 0] = 0.0
    return total * float(scale)


def simple_average(deltas: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """FedAvg of deltas: ``Delta = sum_i w_i Delta_i / sum_i w_i`` (``w_i = 1``: the plain mean, any N)."""
    return merge_deltas(deltas, method="simple_average", weights=weights)


def task_arithmetic(deltas: Sequence[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """Task arithmetic: ``Delta = scale * sum_i Delta_i`` (``scale`` = lambda_TA)."""
    return merge_deltas(deltas, method="task_arithmetic", scale=scale)


def ties(deltas: Sequence[np.ndarray], density: float = 0.2, scale: float = 1.0) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023): trim to the top ``density`` per client, elect signs, disjoint mean, scale.

    See :func:`merge_deltas` for the exact rule and :func:`trim_threshold` for ties at the threshold.
    """
    return merge_deltas(deltas, method="ties", density=density, scale=scale)
