"""A seeded synthetic world of facts: fedke's embedded testbed.

No dataset can be downloaded where fedke runs, so it brings its own: people (subjects of one to
three name tokens), relations phrased by several prompt templates each, one true object per
(subject, relation), counterfactual edit requests, paraphrase and neighbourhood prompts, and
generic filler text. Everything is emitted as CounterFact records (:mod:`fedke.data.records`),
so the editor, the metrics and the simulations treat the world and a real CounterFact file alike.

The same :class:`WorldConfig` gives the same world, byte for byte (:meth:`World.to_json`).

Prompt templates are held out per (subject, template) pair, never as whole templates: every
template is seen in training with other subjects, so accuracy on held-out pairs measures real
paraphrase generalisation rather than unseen words.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Iterator, Sequence

from fedke.data.records import EditCase, EditRequest


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]


# Relation templates: the subject sits first and in the middle, as in real CounterFact prompts.
_RELATION_SPECS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("P551", "lives in", (
        "{} lives in",
        "{} resides in the city of",
        "The home town of {} is",
        "Most days , {} can be found in",
        "The city where {} lives is",
    ), "city"),
    ("P106", "works as", (
        "{} works as a",
        "The profession of {} is",
        "{} earns a living as a",
        "By trade , {} is a",
        "The job that {} does is",
    ), "profession"),
    ("P103", "speaks", (
        "The mother tongue of {} is",
        "{} grew up speaking",
        "{} speaks fluent",
        "The first language of {} is",
        "At home , {} talks in",
    ), "language"),
    ("P1303", "plays", (
        "{} plays the",
        "The instrument of {} is the",
        "{} performs on the",
        "On stage , {} plays the",
        "The favourite instrument of {} is the",
    ), "instrument"),
    ("P54", "supports", (
        "{} is a fan of",
        "The favourite team of {} is",
        "{} supports",
        "Every weekend , {} cheers for",
        "The club that {} follows is",
    ), "team"),
    ("P27", "citizen of", (
        "{} is a citizen of",
        "The passport of {} is from",
        "{} holds the citizenship of",
        "By nationality , {} belongs to",
        "The country of {} is",
    ), "country"),
)

_PROFESSIONS = (
    "baker", "pilot", "farmer", "painter", "surgeon", "lawyer", "sailor", "teacher", "chemist",
    "architect", "carpenter", "journalist", "dentist", "plumber", "poet", "banker", "nurse",
    "engineer", "librarian", "tailor", "jeweller", "potter", "florist", "mechanic", "astronomer",
    "butcher", "clockmaker", "diplomat", "gardener", "historian", "judge", "miner",
)
_INSTRUMENTS = (
    "piano", "violin", "cello", "flute", "trumpet", "harp", "oboe", "clarinet", "drums", "guitar",
    "banjo", "organ", "viola", "tuba", "bassoon", "lute", "mandolin", "accordion", "saxophone",
    "harmonica", "sitar", "trombone", "xylophone", "bagpipes", "zither", "ukulele", "marimba",
    "dulcimer", "bugle", "fiddle", "recorder", "glockenspiel",
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "st", "th", "sh", "ch", "h", "j", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")

_FILLER_SUBJECTS = ("the weather", "the market", "the river", "the old bridge", "the train",
                    "the museum", "the festival", "the harbour", "the library", "the garden")
_FILLER_VERBS = ("was", "seemed", "became", "stayed", "looked", "felt")
_FILLER_ADJECTIVES = ("quiet", "busy", "cold", "warm", "crowded", "empty", "bright", "grey",
                      "calm", "loud", "green", "late")
_FILLER_TAILS = ("today", "this morning", "all week", "in the evening", "after the rain",
                 "before noon", "last year", "for a while")
# Prompt prefixes are full sentences: they end with " ." so prompt + prefix tokenise cleanly.
_KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world. The same config gives the same world, byte for byte.

    Parameters
    ----------
    n_subjects: number of people.
    n_relations: how many of the built-in relations to use (at most 6).
    n_objects: objects per relation.
    seed: the seed of every random choice.
    name_token_weights: relative frequency of subjects with 1, 2 and 3 name tokens.
    heldout_templates: templates held out per (subject, relation) pair for the held-out test.
    n_paraphrases / n_neighbors: evaluation prompts per edit case.
    n_filler: sentences of generic filler text (covariance statistics, context prefixes).
    names_per_token: how many multi-token subjects share each first or last name on average
        (as in real names, a name token narrows the subject down without identifying it).
    """

    n_subjects: int = 1000
    n_relations: int = 5
    n_objects: int = 24
    seed: int = 0
    name_token_weights: tuple[float, float, float] = (0.1, 0.7, 0.2)
    heldout_templates: int = 1
    n_paraphrases: int = 2
    n_neighbors: int = 5
    n_filler: int = 4000
    names_per_token: float = 3.0

    def __post_init__(self) -> None:
        if not 1 <= self.n_relations <= len(_RELATION_SPECS):
            raise ValueError(f"n_relations must be in 1..{len(_RELATION_SPECS)}, got {self.n_relations}")
        if self.n_subjects < 2 or self.n_objects < 2:
            raise ValueError("a world needs at least 2 subjects and 2 objects per relation")
        if self.n_objects > len(_PROFESSIONS):
            raise ValueError(f"n_objects must be at most {len(_PROFESSIONS)}, got {self.n_objects}")
        n_templates = len(_RELATION_SPECS[0][2])
        if not 0 <= self.heldout_templates < n_templates - 1:
            raise ValueError(f"heldout_templates must be in 0..{n_templates - 2}")

    def fingerprint(self) -> str:
        """A short stable hash of the config (part of the world model's cache key)."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    object: str


@dataclass
class World:
    """A generated world. Build one with :func:`make_world`."""

    config: WorldConfig
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    facts: dict[tuple[str, str], str]
    heldout: dict[tuple[str, str], tuple[int, ...]]
    filler: tuple[str, ...]
    name_tokens: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ lookup
    @cached_property
    def relation_by_id(self) -> dict[str, Relation]:
        return {relation.relation_id: relation for relation in self.relations}

    @cached_property
    def subjects_by_fact(self) -> dict[tuple[str, str], list[str]]:
        """(relation_id, object) -> subjects holding that fact, in subject order."""
        index: dict[tuple[str, str], list[str]] = {}
        for subject in self.subjects:
            for relation in self.relations:
                index.setdefault((relation.relation_id, self.facts[subject, relation.relation_id]), []).append(subject)
        return index

    def fact_pairs(self) -> list[tuple[str, str]]:
        """Every (subject, relation id) of the world (every subject holds every relation)."""
        return [(s, r.relation_id) for s in self.subjects for r in self.relations]

    def fact_list(self) -> list[Fact]:
        return [Fact(s, r.relation_id, self.facts[s, r.relation_id]) for s in self.subjects for r in self.relations]

    def vocabulary(self) -> list[str]:
        """Every word the world can write, sorted (the tokenizer's vocabulary)."""
        words: set[str] = set(self.name_tokens)
        for relation in self.relations:
            words.update(relation.objects)
            for template in relation.templates:
                words.update(template.replace("{}", " ").split())
        for sentence in self.filler:
            words.update(sentence.split())
        words.update(_KL_TEMPLATE.replace("{}", " ").split())
        words.update(self._augmentation_words())
        return sorted(words)

    @staticmethod
    def _augmentation_words() -> list[str]:
        return ["In", "other", "words", "Indeed", "It", "is", "true", "that", "and", "also", "a"]

    # ------------------------------------------------------------------ training text
    def training_examples(self) -> list[tuple[str, str]]:
        """(prompt, object) for every fact and every template not held out for that pair."""
        return [(template.format(subject), obj) for (subject, _), (template, obj) in self._trained_statements()]

    def known_fact_requests(self) -> list[EditRequest]:
        """Every fact as the model learned it: one request per (subject, relation, trained template),
        ``target_new = target_true`` = the true object. The preserved knowledge of
        ``MemitConfig.knowledge_weight`` (:meth:`fedke.testbed.Testbed.knowledge_grams`)."""
        return [EditRequest(template, subject, obj, relation_id, obj)
                for (subject, relation_id), (template, obj) in self._trained_statements()]

    def _trained_statements(self) -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
        for subject in self.subjects:
            for relation in self.relations:
                held = set(self.heldout[subject, relation.relation_id])
                obj = self.facts[subject, relation.relation_id]
                for index, template in enumerate(relation.templates):
                    if index not in held:
                        yield (subject, relation.relation_id), (template, obj)

    def heldout_examples(self) -> list[tuple[str, str]]:
        """(prompt, object) for the held-out (subject, template) pairs."""
        examples = []
        for subject in self.subjects:
            for relation in self.relations:
                obj = self.facts[subject, relation.relation_id]
                for index in self.heldout[subject, relation.relation_id]:
                    examples.append((relation.templates[index].format(subject), obj))
        return examples

    def filler_text(self) -> Iterator[str]:
        """Generic text for covariance statistics: filler sentences and true-fact statements,
        the way Wikipedia mixes prose with facts."""
        yield from self.filler

    # ------------------------------------------------------------------ edit cases
    def edit_cases(self, n: int | None = None, *, seed: int | None = None,
                   exclude: Sequence[tuple[str, str]] = ()) -> list[EditCase]:
        """Counterfactual edit cases, at most one per (subject, relation), in a seeded order.

        ``exclude`` lists (subject, relation_id) pairs that must not be edited (already used).
        """
        rng = random.Random(self.config.seed * 7919 + 17 if seed is None else seed)
        pairs = [(s, r.relation_id) for s in self.subjects for r in self.relations]
        rng.shuffle(pairs)
        excluded = set(exclude)
        pairs = [pair for pair in pairs if pair not in excluded]
        if n is not None:
            if n > len(pairs):
                raise ValueError(f"asked for {n} edit cases but the world has only {len(pairs)} free (subject, relation) pairs")
            pairs = pairs[:n]
        return [self.edit_case(subject, relation_id, rng=rng, case_id=i) for i, (subject, relation_id) in enumerate(pairs)]

    def edit_case(self, subject: str, relation_id: str, *, target_new: str | None = None,
                  rng: random.Random | None = None, case_id: int | str = 0) -> EditCase:
        """The counterfactual edit of one fact, with its paraphrase and neighbourhood prompts."""
        rng = rng or random.Random(f"{self.config.seed}/{subject}/{relation_id}")
        relation = self.relation_by_id[relation_id]
        true_object = self.facts[subject, relation_id]
        if target_new is None:
            target_new = rng.choice([o for o in relation.objects if o != true_object])
        n_templates = len(relation.templates)
        order = list(range(n_templates))
        rng.shuffle(order)
        edit_template, paraphrase_templates = order[0], order[1:1 + self.config.n_paraphrases]
        neighbours = [s for s in self.subjects_by_fact[relation_id, true_object] if s != subject]
        neighbours = rng.sample(neighbours, min(self.config.n_neighbors, len(neighbours)))
        attribute_holders = [s for s in self.subjects_by_fact.get((relation_id, target_new), []) if s != subject]
        attribute_holders = rng.sample(attribute_holders, min(self.config.n_neighbors, len(attribute_holders)))
        request = EditRequest(
            prompt=relation.templates[edit_template], subject=subject, target_new=target_new,
            relation_id=relation_id, target_true=true_object, case_id=case_id,
        )
        return EditCase(
            case_id=case_id,
            request=request,
            paraphrase_prompts=tuple(relation.templates[i].format(subject) for i in paraphrase_templates),
            neighborhood_prompts=tuple(rng.choice(relation.templates).format(s) for s in neighbours),
            neighborhood_target=true_object,
            attribute_prompts=tuple(rng.choice(relation.templates).format(s) for s in attribute_holders),
            generation_prompts=(f"{subject} is a", relation.templates[edit_template].format(subject)),
            extra={"target_new_id": target_new, "target_true_id": true_object},
        )

    def augmented_requests(self, request: EditRequest) -> list[EditRequest]:
        """The same fact in every template of its relation (the conflict-resolution augmentation)."""
        relation = self.relation_by_id[request.relation_id]
        return [
            EditRequest(t, request.subject, request.target_new, request.relation_id, request.target_true, request.case_id)
            for t in relation.templates
        ]

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        """A canonical JSON dump: the same config gives the same bytes."""
        return json.dumps({
            "config": asdict(self.config),
            "subjects": list(self.subjects),
            "relations": [asdict(r) for r in self.relations],
            "facts": [[s, r, o] for (s, r), o in sorted(self.facts.items())],
            "heldout": [[s, r, list(t)] for (s, r), t in sorted(self.heldout.items())],
            "filler": list(self.filler),
        }, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- generation
def _pseudo_words(rng: random.Random, n: int, *, syllables: tuple[int, int], taken: set[str],
                  suffix: str = "") -> list[str]:
    words: list[str] = []
    while len(words) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS) + suffix
        word = word.capitalize()
        if word not in taken and len(word) > 2:
            taken.add(word)
            words.append(word)
    return words


def _object_vocabulary(kind: str, rng: random.Random, n: int, taken: set[str]) -> tuple[str, ...]:
    if kind == "profession":
        return tuple(rng.sample(_PROFESSIONS, n))
    if kind == "instrument":
        return tuple(rng.sample(_INSTRUMENTS, n))
    suffix = {"city": "", "language": "ish", "team": "ton", "country": "ia"}[kind]
    return tuple(_pseudo_words(rng, n, syllables=(1, 2), taken=taken, suffix=suffix))


def _subject_names(rng: random.Random, config: WorldConfig, taken: set[str]) -> tuple[list[str], list[str]]:
    """Subjects spanning 1-3 name tokens, composed from shared first/last-name pools.

    Shared pools mean a name token alone does not identify a person: the model has to combine
    the tokens, as it must with real multi-token names.
    """
    weights = config.name_token_weights
    counts = [round(config.n_subjects * w / sum(weights)) for w in weights]
    counts[1] += config.n_subjects - sum(counts)
    pool = max(8, int((counts[1] + counts[2]) / config.names_per_token) + 1)
    firsts = _pseudo_words(rng, pool, syllables=(2, 2), taken=taken)
    lasts = _pseudo_words(rng, pool, syllables=(2, 3), taken=taken)
    mononyms = _pseudo_words(rng, counts[0], syllables=(3, 3), taken=taken)
    names: set[str] = set()
    ordered: list[str] = list(mononyms)
    names.update(mononyms)
    for n_tokens, count in ((2, counts[1]), (3, counts[2])):
        made = 0
        while made < count:
            parts = [rng.choice(firsts)] + ([rng.choice(firsts)] if n_tokens == 3 else []) + [rng.choice(lasts)]
            name = " ".join(parts)
            if name not in names and len(set(parts)) == len(parts):
                names.add(name)
                ordered.append(name)
                made += 1
    rng.shuffle(ordered)
    return ordered, sorted(set(firsts) | set(lasts) | set(mononyms))


def make_world(config: WorldConfig | None = None, **overrides) -> World:
    """Generate the world for ``config`` (or ``WorldConfig(**overrides)``)."""
    if config is None:
        config = WorldConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a WorldConfig or keyword overrides, not both")
    rng = random.Random(config.seed)
    taken: set[str] = set(_PROFESSIONS) | set(_INSTRUMENTS)
    relations = tuple(
        Relation(rid, name, templates, _object_vocabulary(kind, rng, config.n_objects, taken))
        for rid, name, templates, kind in _RELATION_SPECS[: config.n_relations]
    )
    subjects, name_tokens = _subject_names(rng, config, taken)
    facts: dict[tuple[str, str], str] = {}
    heldout: dict[tuple[str, str], tuple[int, ...]] = {}
    for subject in subjects:
        for relation in relations:
            facts[subject, relation.relation_id] = rng.choice(relation.objects)
            heldout[subject, relation.relation_id] = tuple(
                sorted(rng.sample(range(len(relation.templates)), config.heldout_templates)))
    filler = tuple(_filler_sentences(rng, config.n_filler, subjects, relations, facts, heldout))
    return World(config, tuple(subjects), relations, facts, heldout, filler, tuple(name_tokens))


def _filler_sentences(rng: random.Random, n: int, subjects: Sequence[str], relations: Sequence[Relation],
                      facts: dict[tuple[str, str], str],
                      heldout: dict[tuple[str, str], tuple[int, ...]]) -> Iterator[str]:
    for _ in range(n):
        if rng.random() < 0.5:
            yield (f"{rng.choice(_FILLER_SUBJECTS).capitalize()} {rng.choice(_FILLER_VERBS)} "
                   f"{rng.choice(_FILLER_ADJECTIVES)} {rng.choice(_FILLER_TAILS)} .")
        else:
            subject, relation = rng.choice(subjects), rng.choice(relations)
            # Filler states true facts through trained templates only: held-out pairs stay unseen.
            held = heldout[subject, relation.relation_id]
            template = rng.choice([t for i, t in enumerate(relation.templates) if i not in held])
            yield f"{template.format(subject)} {facts[subject, relation.relation_id]} ."
