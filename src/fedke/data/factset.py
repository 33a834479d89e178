"""A fact set: edit cases over real (subject, relation) pairs, behind the same interface as the world.

Scenarios deal requests from a *fact source*: the synthetic :class:`fedke.data.world.World`, or a
:class:`FactSet` built from CounterFact-schema cases (the real-fact set probed from a real model,
:mod:`fedke.data.realfacts`, or a user's CounterFact / zsRE file). Both offer what the drivers use:
``edit_cases``, ``edit_case``, ``fact_pairs``, ``relations`` / ``relation_by_id`` (templates and
objects), ``subjects``, ``facts``, ``known_fact_requests`` and ``augmented_requests``.

A FactSet holds at most one case per (subject, relation): a request's subject and relation name the
fact it rewrites, so a scenario never edits the same fact twice by accident.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterable, Sequence

from fedke.data.records import EditCase, EditRequest
from fedke.data.world import Relation


@dataclass(frozen=True)
class FactSet:
    """Edit cases keyed by (subject, relation id), with the relations they come from.

    ``relations`` give each relation's templates (the first is the edit prompt's; the others
    appear in paraphrases and in conflict augmentation) and its objects (the candidates of a
    counterfactual ``target_new``). :meth:`from_cases` infers them from the cases alone.
    """

    name: str
    cases: tuple[EditCase, ...]
    relations: tuple[Relation, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        seen: dict[tuple[str, str], object] = {}
        for case in self.cases:
            key = (case.subject, case.relation_id)
            if key in seen:
                raise ValueError(f"fact set {self.name!r}: cases {seen[key]!r} and {case.case_id!r} both edit "
                                 f"({case.subject!r}, {case.relation_id!r}); keep one case per (subject, relation)")
            seen[key] = case.case_id

    @classmethod
    def from_cases(cls, name: str, cases: Iterable[EditCase], *, seed: int = 0,
                   dedupe: bool = True) -> "FactSet":
        """A fact set over ``cases`` (e.g. a loaded CounterFact file); relations are inferred:
        templates from the edit prompts (most frequent first), objects from the true and new targets.
        ``dedupe`` keeps the first case of each (subject, relation) and drops the rest."""
        kept: dict[tuple[str, str], EditCase] = {}
        for case in cases:
            key = (case.subject, case.relation_id)
            if key in kept and not dedupe:
                raise ValueError(f"fact set {name!r}: two cases edit ({case.subject!r}, {case.relation_id!r})")
            kept.setdefault(key, case)
        templates: dict[str, dict[str, int]] = {}
        objects: dict[str, dict[str, None]] = {}
        for case in kept.values():
            counts = templates.setdefault(case.relation_id, {})
            counts[case.request.prompt] = counts.get(case.request.prompt, 0) + 1
            for value in (case.request.target_true, case.request.target_new):
                if value:
                    objects.setdefault(case.relation_id, {})[value] = None
        relations = tuple(
            Relation(relation_id, relation_id,
                     tuple(sorted(counts, key=lambda t: (-counts[t], t))), tuple(objects.get(relation_id, {})))
            for relation_id, counts in sorted(templates.items()))
        return cls(name, tuple(kept.values()), relations, seed)

    # ------------------------------------------------------------------ lookup
    @cached_property
    def relation_by_id(self) -> dict[str, Relation]:
        return {relation.relation_id: relation for relation in self.relations}

    @cached_property
    def _case_by_fact(self) -> dict[tuple[str, str], EditCase]:
        return {(case.subject, case.relation_id): case for case in self.cases}

    @cached_property
    def subjects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(case.subject for case in self.cases))

    @cached_property
    def facts(self) -> dict[tuple[str, str], str]:
        """(subject, relation id) -> true object."""
        return {key: case.request.target_true or "" for key, case in self._case_by_fact.items()}

    def fact_pairs(self) -> list[tuple[str, str]]:
        """Every editable (subject, relation id), in the set's order."""
        return list(self._case_by_fact)

    def __len__(self) -> int:
        return len(self.cases)

    # ------------------------------------------------------------------ edit cases
    def edit_cases(self, n: int | None = None, *, seed: int | None = None,
                   exclude: Sequence[tuple[str, str]] = ()) -> list[EditCase]:
        """``n`` cases (all if None) in a seeded order, numbered 0..n-1, none of ``exclude``'s facts."""
        rng = random.Random(self.seed * 7919 + 17 if seed is None else seed)
        excluded = set(exclude)
        pairs = [pair for pair in self.fact_pairs() if pair not in excluded]
        rng.shuffle(pairs)
        if n is not None:
            if n > len(pairs):
                raise ValueError(f"asked for {n} edit cases but fact set {self.name!r} has only {len(pairs)} "
                                 "free (subject, relation) pairs")
            pairs = pairs[:n]
        return [self.edit_case(subject, relation_id, case_id=i) for i, (subject, relation_id) in enumerate(pairs)]

    def edit_case(self, subject: str, relation_id: str, *, target_new: str | None = None,
                  rng: random.Random | None = None, case_id: int | str = 0) -> EditCase:
        """The stored case of one fact, renumbered ``case_id`` (``target_new`` replaces its new object;
        ``rng`` is accepted for the world's signature and not needed: the cases are fixed data)."""
        try:
            case = self._case_by_fact[subject, relation_id]
        except KeyError:
            raise KeyError(f"fact set {self.name!r} has no case for ({subject!r}, {relation_id!r})") from None
        request = replace(case.request, case_id=case_id,
                          target_new=case.request.target_new if target_new is None else target_new)
        extra = dict(case.extra)
        extra.setdefault("source_case_id", case.case_id)
        if target_new is not None:
            extra["target_new_id"] = target_new
        return replace(case, case_id=case_id, request=request, extra=extra)

    # ------------------------------------------------------------------ knowledge and augmentation
    def known_fact_requests(self) -> list[EditRequest]:
        """Each fact as the model holds it: its edit prompt with ``target_new = target_true``
        (the preserved knowledge of ``MemitConfig.knowledge_weight``)."""
        return [EditRequest(case.request.prompt, case.subject, case.request.target_true or case.request.target_new,
                            case.relation_id, case.request.target_true)
                for case in self.cases]

    def augmented_requests(self, request: EditRequest) -> list[EditRequest]:
        """The same fact in every template of its relation (conflict-resolution augmentation)."""
        relation = self.relation_by_id.get(request.relation_id)
        templates = relation.templates if relation is not None else (request.prompt,)
        return [replace(request, prompt=template) for template in templates]
