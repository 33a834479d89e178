"""The real-fact edit set: facts of the real world, probed from a model, as CounterFact records.

``realfacts.json`` (shipped with fedke) lists relations of the real world, each with prompt
templates (the first is the *main* template) and subjects with their true objects. A model is
*probed* on every fact and holds it when the true object ranks first among the relation's
distinct objects by

    score(o) = (1 / |o|) * sum_t log p(o_t | main template(subject), o_<t)

the mean token log-probability of ``" " + o`` (teacher forced, :func:`fedke.eval.encode_target`),
the same quantity ES and NS compare. Every held fact becomes one CounterFact-schema record
(:func:`build_records`): a seeded ``target_new`` among the relation's other held objects, paraphrase
prompts from the other templates, neighbourhood prompts from other held subjects with the same true
object, attribute prompts from held subjects whose true object is the new one. The records and the
probe report are cached under the model's fingerprint and load through the CounterFact loader.

Ranking exactly without scoring every candidate: one forward pass of ``prompt + true object`` gives
the true object's score and the log-probabilities of every candidate's *first* token. A candidate of
``n`` tokens scores at most ``lp(first) / n`` (the other terms are <= 0), so only candidates whose
bound reaches the true object's score are scored in full (best bound first, until one beats the truth);
single-token candidates are exact already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedke.cache import atomic_directory, cache_root
from fedke.data.factset import FactSet
from fedke.data.loaders import (load_counterfact, oversized_int_error, parse_json, read_data_file,
                                save_counterfact)
from fedke.data.records import EditCase, EditRequest, RecordError
from fedke.data.world import Relation

log = logging.getLogger(__name__)

REALFACTS_FORMAT = "fedke.realfacts/1"
N_PARAPHRASES = 2
N_NEIGHBOURS = 5
N_ATTRIBUTES = 3


@dataclass(frozen=True)
class FactRelation:
    """One relation of the fact table: templates (the first is the main one) and subject -> true object."""

    relation_id: str
    name: str
    templates: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]

    @property
    def objects(self) -> tuple[str, ...]:
        """Distinct true objects, in first-seen order."""
        return tuple(dict.fromkeys(obj for _, obj in self.facts))


@dataclass(frozen=True)
class FactTable:
    """The relations of a fact table and the hash of its content (part of every cache key)."""

    relations: tuple[FactRelation, ...]
    digest: str

    @property
    def n_facts(self) -> int:
        return sum(len(relation.facts) for relation in self.relations)


def load_fact_table(path: str | Path | None = None) -> FactTable:
    """Read a fact table (default: fedke's ``realfacts.json``), checking every relation and template.

    Every failure (an unreadable file, invalid or too deeply nested JSON, an integer beyond Python's
    digit limit, a malformed relation) is a RecordError naming the file and the relation or field.
    """
    if path is None:
        raw = resources.files("fedke.data").joinpath("realfacts.json").read_bytes()
        where = "fedke/data/realfacts.json"
    else:
        raw = read_data_file(Path(path))
        where = str(path)
    data = parse_json(raw, where)
    oversized = oversized_int_error(data)
    if oversized is not None:
        raise RecordError(f"{where}: {oversized}")
    if not isinstance(data, Mapping) or not isinstance(data.get("relations"), list):
        raise RecordError(f"{where}: expected an object with a 'relations' list")
    relations = []
    seen_ids: set[str] = set()
    for index, item in enumerate(data["relations"]):
        relation = _parse_relation(item, f"{where}: relation {index}")
        if relation.relation_id in seen_ids:
            raise RecordError(f"{where}: relation id {relation.relation_id!r} appears twice")
        seen_ids.add(relation.relation_id)
        relations.append(relation)
    return FactTable(tuple(relations), hashlib.sha256(raw).hexdigest()[:16])


def _parse_relation(item: Any, where: str) -> FactRelation:
    if not isinstance(item, Mapping):
        raise RecordError(f"{where}: expected an object")
    relation_id, name, templates, facts = (item.get(k) for k in ("relation_id", "name", "templates", "facts"))
    if not isinstance(relation_id, str) or not relation_id:
        raise RecordError(f"{where}: missing 'relation_id'")
    where = f"{where} ({relation_id})"
    if name is not None and not isinstance(name, str):
        raise RecordError(f"{where}: 'name' must be a string")
    if not isinstance(templates, list) or len(templates) < 2 or not all(
            isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise RecordError(f"{where}: 'templates' must list at least two strings with exactly one '{{}}' each")
    if not isinstance(facts, Mapping) or not facts:
        raise RecordError(f"{where}: 'facts' must map subjects to true objects")
    for subject, obj in facts.items():
        if not subject.strip() or not isinstance(obj, str) or not obj.strip():
            raise RecordError(f"{where}: empty subject or object in fact {subject!r} -> {obj!r}")
    return FactRelation(relation_id, str(name or relation_id), tuple(templates),
                        tuple((str(s), str(o)) for s, o in facts.items()))


# ------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class ProbedFact:
    relation_id: str
    subject: str
    true_object: str
    score: float            # the true object's mean token log-probability after the main template
    rival: str              # the best other object found (held: the best of all; else one that beats the truth)
    rival_score: float

    @property
    def held(self) -> bool:
        return self.score > self.rival_score


@torch.inference_mode()
def probe_relation(model, tokenizer, relation: FactRelation, *, batch_size: int = 64,
                   per_round: int = 4) -> list[ProbedFact]:
    """Whether the true object ranks first among ``relation``'s objects, for each subject (exact; see the
    module docstring). ``rival`` is the best rival found: the best of all for a held fact, one that beats
    the truth otherwise (multi-token rivals are scored best bound first, ``per_round`` at a time, until
    one beats the truth or none can)."""
    from fedke.eval import _collate, _pad_id, encode_prompt, encode_target, model_device, score_prompt_targets

    device = model_device(model)
    objects = relation.objects
    object_ids = [encode_target(tokenizer, obj) for obj in objects]
    first = torch.tensor([ids[0] for ids in object_ids], device=device)
    lengths = torch.tensor([len(ids) for ids in object_ids], dtype=torch.float64)
    prompts = [relation.templates[0].format(subject) for subject, _ in relation.facts]
    index_of = {obj: i for i, obj in enumerate(objects)}
    true_scores = np.zeros(len(prompts))
    bounds = np.zeros((len(prompts), len(objects)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            sequences = [(encode_prompt(tokenizer, prompts[i]), object_ids[index_of[relation.facts[i][1]]]) for i in rows]
            input_ids, attention, target_mask = _collate(sequences, _pad_id(tokenizer), device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            for row, i in enumerate(rows):
                n_prompt, n_target = len(sequences[row][0]), len(sequences[row][1])
                # only the positions that predict the object's tokens, in float64
                log_probs = torch.log_softmax(logits[row, n_prompt - 1:n_prompt - 1 + n_target].double(), dim=-1)
                targets = input_ids[row, n_prompt:n_prompt + n_target]
                true_scores[i] = float(log_probs[torch.arange(n_target, device=device), targets].mean())
                bounds[i] = (log_probs[0, first].cpu() / lengths).numpy()
    finally:
        model.train(was_training)
    # exact scores: single-token objects are exact already; longer ones are scored in full only while
    # one might still beat the truth, best bound first, a few per fact and round
    scores = np.where(lengths.numpy()[None, :] == 1, bounds, -np.inf)
    truth = np.array([index_of[obj] for _, obj in relation.facts])
    scores[np.arange(len(prompts)), truth] = -np.inf
    queue = {}
    for i in range(len(prompts)):
        if scores[i].max() > true_scores[i]:
            continue  # a single-token rival already beats the truth: not held
        order = [j for j in np.argsort(-bounds[i]) if lengths[j] > 1 and j != truth[i] and bounds[i, j] >= true_scores[i]]
        if order:
            queue[i] = order
    while queue:
        batch = [(i, j) for i, order in queue.items() for j in order[:per_round]]
        exact = score_prompt_targets(model, tokenizer, [prompts[i] for i, _ in batch], [objects[j] for _, j in batch],
                                     batch_size=batch_size)
        for (i, j), nll in zip(batch, exact.mean_nll.tolist()):
            scores[i, j] = -nll
        queue = {i: order[per_round:] for i, order in queue.items()
                 if order[per_round:] and scores[i].max() <= true_scores[i]}
    probed = []
    for i, (subject, true_object) in enumerate(relation.facts):
        best = int(np.argmax(scores[i]))
        found = bool(np.isfinite(scores[i, best]))  # no rival scored: none could reach the truth
        probed.append(ProbedFact(relation.relation_id, subject, true_object, float(true_scores[i]),
                                 objects[best] if found else "", float(scores[i, best]) if found else float("-inf")))
    return probed


def probe_table(model, tokenizer, table: FactTable, *, progress: bool = True, batch_size: int = 64) -> list[ProbedFact]:
    """:func:`probe_relation` over every relation of ``table``, with a progress bar per relation."""
    from tqdm.auto import tqdm

    probed: list[ProbedFact] = []
    bar = tqdm(table.relations, desc="probing facts", unit="relation", disable=not progress)
    for relation in bar:
        bar.set_postfix_str(f"{relation.name} ({len(relation.facts)} facts)")
        probed += probe_relation(model, tokenizer, relation, batch_size=batch_size)
    return probed


def probe_summary(table: FactTable, probed: Sequence[ProbedFact]) -> dict[str, dict[str, Any]]:
    """Per relation: facts in the table, facts held, distinct held objects."""
    summary = {}
    for relation in table.relations:
        mine = [p for p in probed if p.relation_id == relation.relation_id]
        held = [p for p in mine if p.held]
        summary[relation.relation_id] = {"name": relation.name, "facts": len(mine), "held": len(held),
                                         "held_objects": len({p.true_object for p in held}),
                                         "main_template": relation.templates[0]}
    return summary


# ------------------------------------------------------------------------------------ records


def build_records(table: FactTable, held: Sequence[ProbedFact], *, seed: int = 0) -> list[dict[str, Any]]:
    """CounterFact records of the held facts (see the module docstring); deterministic for a seed."""
    by_relation: dict[str, list[ProbedFact]] = {}
    for fact in held:
        by_relation.setdefault(fact.relation_id, []).append(fact)
    records = []
    for relation in table.relations:
        facts = by_relation.get(relation.relation_id, [])
        holders: dict[str, list[str]] = {}
        for fact in facts:
            holders.setdefault(fact.true_object, []).append(fact.subject)
        candidates = list(holders) if len(holders) > 1 else list(relation.objects)
        for fact in facts:
            rng = random.Random(f"realfacts/{seed}/{relation.relation_id}/{fact.subject}")
            new_object = rng.choice([o for o in candidates if o != fact.true_object])
            others = list(range(1, len(relation.templates)))
            rng.shuffle(others)
            neighbours = [s for s in holders[fact.true_object] if s != fact.subject]
            neighbours = rng.sample(neighbours, min(N_NEIGHBOURS, len(neighbours)))
            attributes = [s for s in holders.get(new_object, []) if s != fact.subject]
            attributes = rng.sample(attributes, min(N_ATTRIBUTES, len(attributes)))
            main = relation.templates[0]
            records.append({
                "case_id": len(records),
                "requested_rewrite": {
                    "prompt": main, "relation_id": relation.relation_id, "subject": fact.subject,
                    "target_new": {"str": new_object, "id": new_object},
                    "target_true": {"str": fact.true_object, "id": fact.true_object},
                },
                "paraphrase_prompts": [relation.templates[k].format(fact.subject) for k in others[:N_PARAPHRASES]],
                "neighborhood_prompts": [main.format(s) for s in neighbours],
                "attribute_prompts": [main.format(s) for s in attributes],
                "generation_prompts": [f"{fact.subject} is", main.format(fact.subject)],
            })
    return records


# ------------------------------------------------------------------------------------- cached set


def real_fact_set(model, tokenizer, *, table: FactTable | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None, progress: bool = True,
                  model_fingerprint: str | None = None) -> FactSet:
    """The facts ``model`` holds, as a :class:`FactSet`, probed once and cached under the model's
    fingerprint, the table's hash and the seed (``<cache>/realfacts/...``: ``counterfact.json``,
    loadable with :func:`fedke.data.loaders.load_counterfact`, and ``probe.json``, the report)."""
    from fedke.stats import model_fingerprint as fingerprint_of

    table = table or load_fact_table()
    fingerprint = model_fingerprint or fingerprint_of(model)
    directory = fact_set_dir(fingerprint, table, seed=seed, cache_dir=cache_dir)
    if not (directory / "counterfact.json").exists():
        probed = probe_table(model, tokenizer, table, progress=progress)
        held = [fact for fact in probed if fact.held]
        report = {"format": REALFACTS_FORMAT, "model_fingerprint": fingerprint, "table": table.digest, "seed": seed,
                  "n_facts": len(probed), "n_held": len(held), "relations": probe_summary(table, probed),
                  "held_when": "the true object's mean token log-probability after the main template is above "
                               "every other object of the relation's",
                  "facts": [fact.__dict__ | {"held": fact.held} for fact in probed]}
        with atomic_directory(directory) as tmp:
            save_counterfact(_as_cases(build_records(table, held, seed=seed)), tmp / "counterfact.json")
            (tmp / "probe.json").write_text(json.dumps(report, indent=1))
        log.info("real-fact set: the model holds %d of %d facts", len(held), len(probed))
    return fact_set_from_file(directory / "counterfact.json", table=table, seed=seed, name="realfacts")


def fact_set_dir(model_fingerprint: str, table: FactTable, *, seed: int = 0,
                 cache_dir: str | Path | None = None) -> Path:
    """Where :func:`real_fact_set` caches a model's fact set (``counterfact.json``, ``probe.json``)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "realfacts" / model_fingerprint / f"{table.digest}-seed{seed}"


def _as_cases(records: Sequence[Mapping[str, Any]]) -> list[EditCase]:
    from fedke.data.records import case_from_counterfact

    return [case_from_counterfact(record, i) for i, record in enumerate(records)]


def probe_report(fact_set_dir: str | Path) -> dict[str, Any]:
    """The probe report next to a cached real-fact set."""
    return json.loads((Path(fact_set_dir) / "probe.json").read_text())


def fact_set_from_file(path: str | Path, *, table: FactTable | None = None, seed: int = 0,
                       name: str | None = None) -> FactSet:
    """A :class:`FactSet` over a CounterFact file; relations from ``table`` where it names them
    (their templates and held objects), inferred from the cases otherwise."""
    cases = load_counterfact(path)
    inferred = FactSet.from_cases(name or Path(path).stem, cases, seed=seed)
    if table is None:
        return inferred
    known = {relation.relation_id: relation for relation in table.relations}
    relations = tuple(
        Relation(r.relation_id, known[r.relation_id].name, known[r.relation_id].templates, r.objects)
        if r.relation_id in known else r for r in inferred.relations)
    return FactSet(inferred.name, inferred.cases, relations, seed)

