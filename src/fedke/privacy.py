"""How private is K K^T? An attacker's view of a client's payload (CollabEdit paper, section 6).

A CollabEdit client sends ``G = K K^T`` (d_in x d_in) instead of its keys ``K = [k_1 .. k_M]``
because keys can be inverted back to text. ``G`` determines ``K`` only up to a rotation
(``K Q`` for any orthogonal ``Q`` gives the same ``G``), but with few edits the rotation hardly
hides anything: for ``M = 1``, ``G = k k^T`` and its top eigenvector IS ``k / |k|`` up to sign.

The attacker here holds ``G`` and the model (as the server does), so it can compute the key of
any candidate prompt: a dictionary ``D`` of keys of every (subject, relation, template) of the
world. It takes the top ``M`` eigenvectors ``u_1 .. u_M`` of ``G`` and measures

* ``cosine``: for each true key ``k_j``, the best ``|cos(u_i, k_j)|`` over ``i`` (mean over ``j``);
* ``reid_top1``: for each ``k_j``, its best-matching eigenvector's nearest dictionary entry by
  ``|cos|``; a hit when that entry's subject is ``k_j``'s subject (fraction of hits).

Sharing ``K`` itself is the reference: cosine 1 and the nearest-neighbour of ``k_j`` itself.

Subspace attacks (the server's view of one payload, and of a secure sum)
-----------------------------------------------------------------------
Any payload of ``M`` edits pins down the key SUBSPACE ``span(K)`` exactly, and a candidate key is
tested for membership instead of being matched to one eigenvector:

* from ``G = K K^T``: ``span(K)`` is the span of its top ``M`` eigenvectors
  (:func:`top_eigenvectors`);
* from ``Delta`` alone (KSTER-style): ``Delta (A0 + K K^T) = R K^T`` with the PUBLIC regulariser
  ``A0 = lam C0`` (the server merges with it), so ``Delta A0 = (R - Delta K) K^T
  = R (I + K^T A0^-1 K)^-1 K^T``: every row of ``Delta A0`` lies in ``span(K)`` and, for
  ``d_out >= M`` and a generic ``R``, they span it (:func:`delta_key_basis`): an edited key scores
  exactly 1. ``Delta``'s own row space is ``A0^-1 span(K)``, which ``C0^-1`` tilts towards the keys'
  low-variance directions, so the naive test on ``Delta``'s right singular vectors
  (:func:`row_space_basis`) scores the edited keys below 1 and has no exact threshold (it can still
  rank them first: bench/privacy.py measures both).

:func:`subspace_scores` gives each candidate ``|P_V k| / |k|`` (1 for a key in the subspace);
:func:`rank_labels` ranks subjects by their best entry and :func:`precision_at_m` is the fraction
of the ``M`` true subjects among the top ``M`` (for ``M = 1``, top-1 re-identification; chance
``M / n`` for ``n`` candidate subjects). Under secure aggregation the server holds only
``sum_i K_i K_i^T``, ``sum_i R_i K_i^T`` and the merged ``Delta = S (A0 + G)^-1``
(:func:`merged_delta`): the same tests reveal the UNION of the clients' subjects, and every split
of the same edits among the clients gives the same sums, so which client edited what stays at
chance (:func:`per_client_precision`).

All functions are pure (arrays in, arrays out), float64, no explicit inverses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["best_cosines", "delta_key_basis", "distinct_subject_cases", "merged_delta", "nearest_labels", "per_client_precision",
           "precision_at_m", "rank_labels", "reidentify", "reidentify_from_vectors", "row_space_basis",
           "subspace_reidentify", "subspace_scores", "top_eigenvectors", "unit_columns"]


def unit_columns(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with every column scaled to unit norm (zero columns stay zero)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=0)
    return matrix / np.where(norms > 0, norms, 1.0)


def top_eigenvectors(gram: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` unit eigenvectors of the symmetric ``gram`` with the largest eigenvalues, ``(d, m)``."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square, got shape {gram.shape}")
    if not 1 <= m <= gram.shape[0]:
        raise ValueError(f"m must be in 1..{gram.shape[0]}, got {m}")
    _, vectors = np.linalg.eigh(0.5 * (gram + gram.T))
    return vectors[:, ::-1][:, :m]


def best_cosines(candidates: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each key (column of ``keys``) the best ``|cos|`` over the ``candidates`` columns, and which one.

    Returns ``(cosines (M,), index of the best candidate (M,))``.
    """
    sims = np.abs(unit_columns(candidates).T @ unit_columns(keys))  # (n_candidates, M)
    return sims.max(axis=0), sims.argmax(axis=0)


def nearest_labels(queries: np.ndarray, dictionary: np.ndarray, labels: Sequence) -> list:
    """The label of the nearest dictionary column (by ``|cos|``) of every query column."""
    sims = np.abs(unit_columns(dictionary).T @ unit_columns(queries))  # (n_dict, n_queries)
    return [labels[i] for i in sims.argmax(axis=0)]


def reidentify(gram: np.ndarray | None, keys: np.ndarray, subjects: Sequence, dictionary: np.ndarray,
               labels: Sequence) -> tuple[float, float]:
    """``(mean best cosine, top-1 re-identification rate)`` of an attacker holding ``gram`` (= K K^T).

    ``gram=None`` is the attacker holding ``K`` itself (cosine 1, each key looked up directly).
    ``subjects[j]`` is the subject of ``keys[:, j]``; ``dictionary`` columns are candidate keys with
    subject ``labels``.
    """
    keys = np.asarray(keys, dtype=np.float64)
    if gram is None:
        found = nearest_labels(keys, dictionary, labels)
        return 1.0, float(np.mean([a == b for a, b in zip(found, subjects)]))
    return reidentify_from_vectors(top_eigenvectors(gram, keys.shape[1]), keys, subjects, dictionary, labels)


def reidentify_from_vectors(vectors: np.ndarray, keys: np.ndarray, subjects: Sequence, dictionary: np.ndarray,
                            labels: Sequence) -> tuple[float, float]:
    """:func:`reidentify` given the eigenvectors ``top_eigenvectors(gram, M)`` already computed."""
    cosines, best = best_cosines(vectors, keys)
    found = nearest_labels(np.asarray(vectors)[:, best], dictionary, labels)
    hits = np.mean([a == b for a, b in zip(found, subjects)])
    return float(np.mean(cosines)), float(hits)


def row_space_basis(matrix: np.ndarray, m: int) -> np.ndarray:
    """Orthonormal basis ``(d_in, m)`` of the top-``m`` right singular vectors of ``matrix`` ``(d_out, d_in)``.

    Thin SVD ``matrix = U S V^T`` (singular values descending); returns ``V[:, :m]``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {matrix.shape}")
    if not 1 <= m <= min(matrix.shape):
        raise ValueError(f"m must be in 1..{min(matrix.shape)}, got {m}")
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return vt[:m].T


def delta_key_basis(delta: np.ndarray, regulariser: np.ndarray, m: int) -> np.ndarray:
    """A basis of ``span(K)`` from ``Delta`` and the public regulariser ``A0`` alone, ``(d_in, m)``.

    MEMIT's normal equation ``Delta (A0 + K K^T) = R K^T`` gives

        ``Delta A0 = (R - Delta K) K^T = R (I_M + K^T A0^-1 K)^-1 K^T``   (Woodbury),

    so the rows of ``Delta A0`` lie in ``span(K)`` and (``d_out >= M``, ``R`` of rank ``M``) span it:
    the top ``m`` right singular vectors of ``Delta A0`` are an orthonormal basis of ``span(K)``.
    The same holds for a merged ``Delta = S (A0 + G)^-1`` with ``span(union of the keys)``.
    """
    delta = np.asarray(delta, dtype=np.float64)
    regulariser = np.asarray(regulariser, dtype=np.float64)
    if regulariser.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"regulariser shape {regulariser.shape} does not match delta {delta.shape}")
    return row_space_basis(delta @ regulariser, m)


def merged_delta(rkt_sum: np.ndarray, kkt_sum: np.ndarray, regulariser: np.ndarray) -> np.ndarray:
    """CollabEdit's merge from the sums: ``Delta = S (A0 + G)^-1``, solved as ``(A0 + G) Delta^T = S^T``."""
    system = np.asarray(regulariser, dtype=np.float64) + np.asarray(kkt_sum, dtype=np.float64)
    system = 0.5 * (system + system.T)
    return np.linalg.solve(system, np.asarray(rkt_sum, dtype=np.float64).T).T


def subspace_scores(basis: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``|V^T k| / |k|`` for every candidate column ``k``: the cosine between ``k`` and the subspace
    spanned by the orthonormal columns of ``basis`` ``V`` (1 for a key inside it), ``(n,)``."""
    basis = np.asarray(basis, dtype=np.float64)
    return np.linalg.norm(basis.T @ unit_columns(candidates), axis=0)


def rank_labels(scores: np.ndarray, labels: Sequence) -> list:
    """The distinct ``labels`` ordered by their best score (max over their entries), best first;
    ties keep first-seen order."""
    best: dict = {}
    for score, label in zip(np.asarray(scores, dtype=np.float64), labels):
        if label not in best or score > best[label]:
            best[label] = float(score)
    names, values = list(best), list(best.values())
    return [names[i] for i in sorted(range(len(names)), key=lambda i: -values[i])]


def precision_at_m(ranked: Sequence, true_labels: Sequence) -> float:
    """``|top-M of ranked  &  true| / M`` with ``M`` the number of distinct true labels."""
    truth = set(true_labels)
    if not truth:
        raise ValueError("no true labels")
    return len(set(ranked[:len(truth)]) & truth) / len(truth)


def subspace_reidentify(basis: np.ndarray, dictionary: np.ndarray, labels: Sequence, subjects: Sequence) -> float:
    """Re-identification by subspace membership: the fraction of ``subjects`` among the attacker's top
    ``M`` dictionary labels ranked by :func:`subspace_scores` (``M = len(set(subjects))``)."""
    return precision_at_m(rank_labels(subspace_scores(basis, dictionary), labels), subjects)


def per_client_precision(basis: np.ndarray, dictionary: np.ndarray, labels: Sequence,
                         client_subjects: Sequence[Sequence]) -> float:
    """The per-client attack run on an AGGREGATE: for each client, the top ``M_c`` labels of the
    aggregate's ranking are guessed as that client's subjects; mean precision over clients.

    The aggregate is the same for every split of the edits among the clients, so the guess cannot
    depend on the split: with the union recovered, the expected precision is ``M_c / sum_c M_c``
    (``1 / N`` for equal shares).
    """
    ranked = rank_labels(subspace_scores(basis, dictionary), labels)
    return float(np.mean([precision_at_m(ranked, subjects) for subjects in client_subjects]))


def distinct_subject_cases(cases: Sequence, n: int) -> list:
    """The first ``n`` of ``cases`` (edit cases, in their order) whose subjects differ (fewer if
    ``cases`` hold fewer distinct subjects)."""
    chosen, seen = [], set()
    for case in cases:
        if len(chosen) == n:
            break
        if case.request.subject not in seen:
            seen.add(case.request.subject)
            chosen.append(case)
    return chosen


def world_dictionary(world, editor, layer: str, *, batch_size: int = 256) -> tuple[np.ndarray, list[str]]:
    """Keys of every (subject, relation, template) of ``world`` at ``layer``: the attacker's dictionary.

    Returns ``(keys (d_in, n), subject of each column)``.
    """
    from fedke.data.records import EditRequest

    requests, labels = [], []
    for subject in world.subjects:
        for relation in world.relations:
            for template in relation.templates:
                requests.append(EditRequest(prompt=template, subject=subject, target_new=relation.objects[0]))
                labels.append(subject)
    return editor.keys(requests, batch_size=batch_size)[layer], labels


def inversion_curve(world, editor, ms: Sequence[int] = (1, 2, 4, 8, 16, 32), *, trials: int = 5, seed: int = 0,
                    layer: str | None = None, dictionary: tuple[np.ndarray, list[str]] | None = None) -> dict:
    """The K K^T inversion study on ``world``: for each ``M``, ``trials`` clients of ``M`` random edit
    requests (distinct subjects); mean cosine and top-1 re-identification for an attacker holding
    ``K K^T`` and for one holding ``K``.

    Returns ``{"layer", "M", "cosine", "reid_top1", "cosine_K", "reid_top1_K", "dictionary_size"}``.
    """
    layer = layer or editor.layer_names[0]
    keys_dict, labels = dictionary if dictionary is not None else world_dictionary(world, editor, layer)
    rng = np.random.default_rng(seed)
    cases = world.edit_cases(None, seed=seed)
    out = {"layer": layer, "M": [], "cosine": [], "reid_top1": [], "cosine_K": [], "reid_top1_K": [],
           "dictionary_size": int(keys_dict.shape[1]), "trials": int(trials)}
    for m in ms:
        results = []
        for _ in range(trials):
            chosen = distinct_subject_cases([cases[index] for index in rng.permutation(len(cases))], m)
            keys = editor.keys([case.request for case in chosen])[layer]
            subjects = [case.request.subject for case in chosen]
            results.append(reidentify(keys @ keys.T, keys, subjects, keys_dict, labels)
                           + reidentify(None, keys, subjects, keys_dict, labels))
        mean = np.mean(np.array(results), axis=0)
        out["M"].append(int(m))
        for key, value in zip(("cosine", "reid_top1", "cosine_K", "reid_top1_K"), mean):
            out[key].append(float(value))
    return out
