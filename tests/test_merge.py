"""fedke.merge: CollabEdit == Global-Edit, the task-arithmetic merges by hand, shape errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedke.merge import (
    MERGE_METHODS,
    SingularSystemError,
    collab_edit,
    collab_edit_from_sums,
    collab_sums,
    get_merge_method,
    global_edit,
    merge_deltas,
    rcond_threshold,
    residual_after_repeat,
    rkt_from_delta,
    simple_average,
    solve_right,
    spd_factor,
    task_arithmetic,
    ties,
    trim_threshold,
)

D_OUT, D_IN = 5, 12


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_spd(rng: np.random.Generator, n: int) -> np.ndarray:
    samples = rng.standard_normal((n, 3 * n))
    return samples @ samples.T / (3 * n) + 0.1 * np.eye(n)


@pytest.fixture
def clients():
    """Four clients with 3, 2, 5 and 1 keys, their own MEMIT deltas, and A0 = lam * C."""
    rng = np.random.default_rng(0)
    regulariser = 2.0 * random_spd(rng, D_IN)
    keys = [rng.standard_normal((D_IN, m)) for m in (3, 2, 5, 1)]
    residuals = [rng.standard_normal((D_OUT, k.shape[1])) for k in keys]
    deltas = [global_edit(r, k, regulariser) for r, k in zip(residuals, keys)]
    kkts = [k @ k.T for k in keys]
    return residuals, keys, deltas, kkts, regulariser


# ----------------------------------------------------------------------------- closed forms


def test_solve_right_solves_from_the_right():
    rng = np.random.default_rng(1)
    gram = random_spd(rng, D_IN)
    rhs = rng.standard_normal((D_OUT, D_IN))
    x = solve_right(rhs, gram)
    assert x.shape == (D_OUT, D_IN)
    assert rel_err(x @ gram, rhs) < 1e-12


def test_solve_right_refuses_a_matrix_that_is_not_positive_definite():
    """No fallback (it used to solve an indefinite system with a bare RuntimeWarning)."""
    rng = np.random.default_rng(2)
    gram = random_spd(rng, D_IN) - 0.5 * np.eye(D_IN) * 10  # symmetric, indefinite, invertible
    rhs = rng.standard_normal((D_OUT, D_IN))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SingularSystemError, match="layer 'x' gram is not positive definite"):
            solve_right(rhs, gram, what="layer 'x' gram")


@pytest.mark.parametrize("kind", ["exactly", "nearly"])
def test_solve_right_refuses_a_singular_matrix(kind):
    """An exactly singular PSD matrix fails Cholesky; a nearly singular one passes it but its
    reciprocal condition number is below n eps: both raise, never a least-squares fallback."""
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((D_IN, 3))
    gram = keys @ keys.T  # rank 3 < D_IN
    if kind == "nearly":
        gram = gram + 1e-18 * np.eye(D_IN)
    else:
        gram[:, 0] = gram[0, :] = 0.0
    rhs = rng.standard_normal((D_OUT, D_IN))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SingularSystemError, match="gram"):
            solve_right(rhs, gram)
    with pytest.raises(SingularSystemError):
        collab_edit_from_sums(rhs, gram, np.zeros((D_IN, D_IN)), what="layer 'h.1' A_t + G")


def test_spd_factor_accepts_a_well_conditioned_matrix_and_names_a_bad_one():
    rng = np.random.default_rng(5)
    good = random_spd(rng, D_IN)
    factor, lower = spd_factor(good)
    assert not lower and np.allclose(np.triu(factor).T @ np.triu(factor), good)
    for bad, pattern in ((np.full((D_IN, D_IN), np.nan), "has non-finite"), (-good, "is not positive definite"),
                         (np.diag([1.0] * (D_IN - 1) + [1e-30]), "is numerically singular")):
        with pytest.raises(SingularSystemError, match=f"regularisers\\['l'\\] {pattern}"):
            spd_factor(bad, "regularisers['l']")
    assert rcond_threshold(D_IN) == D_IN * np.finfo(np.float64).eps


def test_collab_edit_equals_global_edit_on_concatenated_keys(clients):
    residuals, keys, deltas, kkts, regulariser = clients
    expected = global_edit(np.hstack(residuals), np.hstack(keys), regulariser)
    merged = collab_edit(deltas, kkts, regulariser)
    from_sums = collab_edit_from_sums(
        sum(r @ k.T for r, k in zip(residuals, keys)), sum(kkts), regulariser
    )
    assert rel_err(merged, expected) < 1e-10
    assert rel_err(from_sums, expected) < 1e-10


def test_collab_edit_streams_generators(clients):
    _, _, deltas, kkts, regulariser = clients
    streamed = collab_edit((d for d in deltas), (k for k in kkts), regulariser)
    assert rel_err(streamed, collab_edit(deltas, kkts, regulariser)) < 1e-14


def test_rkt_from_delta_recovers_r_kt(clients):
    residuals, keys, deltas, kkts, regulariser = clients
    for r, k, delta, kkt in zip(residuals, keys, deltas, kkts):
        assert rel_err(rkt_from_delta(delta, kkt, regulariser), r @ k.T) < 1e-10
    rkt_sum, kkt_sum = collab_sums(deltas, kkts, regulariser)
    assert rel_err(rkt_sum, sum(r @ k.T for r, k in zip(residuals, keys))) < 1e-10
    assert rel_err(kkt_sum, sum(kkts)) < 1e-14


def test_tiny_regulariser_reproduces_the_residuals():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((D_IN, 7))  # M < d_in
    residuals = rng.standard_normal((D_OUT, 7))
    delta = global_edit(residuals, keys, 1e-9 * np.eye(D_IN))
    assert rel_err(delta @ keys, residuals) < 1e-6


def test_residual_after_repeat_decreases_monotonically(clients):
    residuals, keys, _, _, regulariser = clients
    r, k = np.hstack(residuals), np.hstack(keys)
    norms = residual_after_repeat(r, k, regulariser, 6)
    assert norms.shape == (7,)
    assert norms[0] == pytest.approx(np.linalg.norm(r))
    assert np.all(np.diff(norms) < 0)
    per_request = residual_after_repeat(r, k, regulariser, 3, per_request=True)
    assert per_request.shape == (4, k.shape[1])
    # the Frobenius norm of the per-request norms is the total norm (each column need not fall)
    np.testing.assert_allclose(np.linalg.norm(per_request, axis=1), norms[:4], rtol=1e-12)
    # one repeat is exactly R - Delta K with Delta the Global-Edit solve
    once = r - global_edit(r, k, regulariser) @ k
    assert norms[1] == pytest.approx(np.linalg.norm(once), rel=1e-12)


# ----------------------------------------------------------------------------- task-arithmetic merges


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
def test_simple_average_is_the_mean_for_every_n(n):
    rng = np.random.default_rng(n)
    deltas = [rng.standard_normal((D_OUT, D_IN)) for _ in range(n)]
    np.testing.assert_allclose(simple_average(deltas), np.mean(deltas, axis=0), rtol=1e-13, atol=1e-15)
    weights = rng.uniform(0.5, 3.0, n)
    np.testing.assert_allclose(
        simple_average(deltas, weights), np.average(deltas, axis=0, weights=weights), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(MERGE_METHODS["fedavg"](deltas), np.mean(deltas, axis=0), rtol=1e-13, atol=1e-15)


def test_task_arithmetic_is_the_scaled_sum():
    rng = np.random.default_rng(4)
    deltas = [rng.standard_normal((D_OUT, D_IN)) for _ in range(3)]
    np.testing.assert_allclose(task_arithmetic(deltas), sum(deltas), rtol=1e-13)
    np.testing.assert_allclose(task_arithmetic(deltas, scale=0.4), 0.4 * sum(deltas), rtol=1e-13)


TIES_CLIENTS = [
    np.array([[4.0, -1.0, 2.0], [0.5, 3.0, -0.2]]),  # top 3: 4, 3, 2
    np.array([[2.0, -6.0, -1.0], [0.1, -5.0, 0.3]]),  # top 3: -6, -5, 2
    np.array([[-1.0, -2.0, 0.4], [7.0, 1.0, 0.2]]),  # top 3: 7, -2, then |1| twice at the threshold
]


def test_ties_by_hand():
    # density 0.5 of 6 entries: k = 3 per client. Trimmed:
    #   A = [[ 4,  0, 2], [0,  3, 0]]
    #   B = [[ 2, -6, 0], [0, -5, 0]]
    #   C = [[-1, -2, 0], [7,  1, 0]]   (the two entries tying at |1| are both kept)
    # summed = [[5, -8, 2], [7, -1, 0]] -> elected signs [[+, -, +], [+, -, 0]]
    # disjoint mean over agreeing non-zero entries:
    #   (0,0): A 4, B 2 agree, C -1 does not -> 3      (0,1): B -6, C -2 -> -4
    #   (0,2): A 2 -> 2                                (1,0): C 7 -> 7
    #   (1,1): B -5 (A 3 and C 1 disagree) -> -5       (1,2): nothing kept -> 0
    expected = np.array([[3.0, -4.0, 2.0], [7.0, -5.0, 0.0]])
    assert trim_threshold(TIES_CLIENTS[2], 0.5) == 1.0
    np.testing.assert_allclose(ties(TIES_CLIENTS, density=0.5), expected)
    np.testing.assert_allclose(ties(TIES_CLIENTS, density=0.5, scale=2.0), 2.0 * expected)
    np.testing.assert_allclose(get_merge_method("TIES")(TIES_CLIENTS, density=0.5), expected)


def test_ties_without_trimming_keeps_the_majority_sign():
    # density 1: no trim. Entry 0: +3 +1 -2 -> sum +2, mean of agreeing (3, 1) = 2.
    # Entry 1: -1 -1 +4 -> sum +2, only +4 agrees -> 4. Entry 2: +1 -1 0 -> sum 0 -> 0.
    deltas = [np.array([3.0, -1.0, 1.0]), np.array([1.0, -1.0, -1.0]), np.array([-2.0, 4.0, 0.0])]
    np.testing.assert_allclose(ties(deltas, density=1.0), [2.0, 4.0, 0.0])
    # weights [2, 1, 1]: signs from 2A + B + C = [5, 1, 1] -> all +;
    # entry 0: (2*3 + 1*1) / (2 + 1) = 7/3; entry 1: only C (w 1) -> 4; entry 2: only A -> 2*1 / 2 = 1
    weighted = merge_deltas(deltas, method="ties", weights=[2.0, 1.0, 1.0])
    np.testing.assert_allclose(weighted, [7.0 / 3.0, 4.0, 1.0])


def test_ties_default_density_and_registry():
    rng = np.random.default_rng(5)
    deltas = [rng.standard_normal((D_OUT, D_IN)) for _ in range(4)]
    np.testing.assert_allclose(MERGE_METHODS["ties"](deltas), ties(deltas))
    np.testing.assert_allclose(
        merge_deltas(deltas, method="ties", density=0.2), ties(deltas, density=0.2)
    )
    # each client keeps round(0.2 * 60) = 12 entries
    assert np.count_nonzero(np.abs(deltas[0]) >= trim_threshold(deltas[0], 0.2)) == 12


def test_unknown_merge_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown merge method 'dare'.*fedavg, simple_average, task_arithmetic, ties"):
        get_merge_method("dare")


# ----------------------------------------------------------------------------- shape errors


def test_shape_errors_name_the_argument(clients):
    residuals, keys, deltas, kkts, regulariser = clients
    with pytest.raises(ValueError, match="residuals .* keys .* same number of columns"):
        global_edit(residuals[0], keys[1], regulariser)
    with pytest.raises(ValueError, match="regulariser must be"):
        global_edit(residuals[0], keys[0], regulariser[:-1, :-1])
    with pytest.raises(ValueError, match="gram must be square"):
        solve_right(deltas[0], np.ones((D_IN, D_IN - 1)))
    with pytest.raises(ValueError, match="gram must be"):
        solve_right(deltas[0], np.eye(D_IN + 1))
    with pytest.raises(ValueError, match="one entry per client"):
        collab_edit(deltas, kkts[:-1], regulariser)
    with pytest.raises(ValueError, match="one entry per client"):
        collab_edit(iter(deltas), iter(kkts[:-1]), regulariser)
    with pytest.raises(ValueError, match=r"kkts\[1\]"):
        collab_edit(deltas, [kkts[0], kkts[1][:-1, :-1]] + kkts[2:], regulariser)
    with pytest.raises(ValueError, match=r"deltas\[2\]"):
        collab_edit(deltas[:2] + [deltas[2][:-1]] + deltas[3:], kkts, regulariser)
    with pytest.raises(ValueError, match="deltas is empty"):
        collab_edit([], [], regulariser)
    with pytest.raises(ValueError, match="kkt_sum must be"):
        collab_edit_from_sums(deltas[0], kkts[0][:-1, :-1], regulariser)
    with pytest.raises(ValueError, match=r"deltas\[1\] has shape"):
        simple_average([deltas[0], deltas[1][:, :-1]])
    with pytest.raises(ValueError, match="deltas is empty"):
        task_arithmetic([])
    with pytest.raises(ValueError, match="weights must have one entry per delta"):
        simple_average(deltas, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        simple_average(deltas, weights=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="density"):
        ties(deltas, density=0.0)
    with pytest.raises(ValueError, match="repeats"):
        residual_after_repeat(residuals[0], keys[0], regulariser, -1)
