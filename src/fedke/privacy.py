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
All functions are pure (arrays in, arrays out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["best_cosines", "nearest_labels", "reidentify", "top_eigenvectors", "unit_columns"]


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
        queries, cosines = keys, np.ones(keys.shape[1])
    else:
        vectors = top_eigenvectors(gram, keys.shape[1])
        cosines, best = best_cosines(vectors, keys)
        queries = vectors[:, best]
    found = nearest_labels(queries, dictionary, labels)
    hits = np.mean([a == b for a, b in zip(found, subjects)])
    return float(np.mean(cosines)), float(hits)


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
            chosen, seen = [], set()
            for index in rng.permutation(len(cases)):
                if cases[index].request.subject not in seen:
                    seen.add(cases[index].request.subject)
                    chosen.append(cases[index])
                if len(chosen) == m:
                    break
            keys = editor.keys([case.request for case in chosen])[layer]
            subjects = [case.request.subject for case in chosen]
            results.append(reidentify(keys @ keys.T, keys, subjects, keys_dict, labels)
                           + reidentify(None, keys, subjects, keys_dict, labels))
        mean = np.mean(np.array(results), axis=0)
        out["M"].append(int(m))
        for key, value in zip(("cosine", "reid_top1", "cosine_K", "reid_top1_K"), mean):
            out[key].append(float(value))
    return out
