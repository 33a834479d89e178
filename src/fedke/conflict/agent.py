"""Client side: the conflict agent that claims, withdraws and re-edits with augmentation, and
the failure check of the after-the-fact mode; requests never leave the client."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from fedke.data.records import EditCase, EditRequest

from .claims import encode_claims
from .resolution import FCFS, Claim, ResolutionPolicy, decide, find_collisions, parse_decisions
from .tokens import DETECTION_MODES, _check_secret, request_tokens


# ----------------------------------------------------------------------------- client side


def case_timestamp(case: EditCase, default: float = 0.0) -> float:
    """When the request was made: ``case.extra["timestamp"]`` (the scenario sets one), else ``default``."""
    value = case.extra.get("timestamp", default) if case.extra else default
    return float(value)


@dataclass
class ConflictAgent:
    """A client's side of conflict handling: tokens for its requests, local resolution, decisions.

    Stateless across calls apart from its settings, so a client rebuilt every round (as Flower's
    simulation does) behaves the same: the client's own cases are re-tokenised when decisions come.

    Parameters
    ----------
    secret : bytes
        The federation secret (:func:`load_secret`); the server must not hold it.
    mode : str
        ``"hmac"``: claim every request with the payload; ``"failures"``: report failing
        requests after the fact.
    policy : ResolutionPolicy
        Resolves conflicts among the client's *own* requests before editing (CollabEdit Table 7,
        ``m1 = m2``): the loser is dropped and the winner augmented right away.
    augment : Callable[[EditRequest], list[EditRequest]] | None
        Augmentation of a winning request; None re-edits the request as it is.
    name : str
        The client's declared name (priority lists).
    """

    secret: bytes = field(repr=False)  # never in logs
    mode: str = "hmac"
    policy: ResolutionPolicy = field(default_factory=FCFS)
    augment: Callable[[EditRequest], list[EditRequest]] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in DETECTION_MODES or self.mode == "off":
            raise ValueError(f"conflict agent mode must be 'hmac' or 'failures', got {self.mode!r}")
        self.secret = _check_secret(self.secret)

    def tokens(self, case: EditCase) -> tuple[str, str]:
        return request_tokens(self.secret, case.request)

    def resolve_locally(self, cases: Sequence[EditCase]) -> tuple[list[EditCase], list[EditCase], list[EditCase]]:
        """``(kept, winners, losers)`` among the client's own batch: conflicting requests (same
        token, different object) are settled by the policy; exact duplicates are kept once."""
        claims = []
        for slot, case in enumerate(cases):
            token, otoken = self.tokens(case)
            claims.append(Claim("self", self.name, 0, token, otoken, case_timestamp(case), slot, slot))
        drop: set[int] = set()
        winners: list[EditCase] = []
        losers: list[EditCase] = []
        for collision in find_collisions(claims):
            for claim, action in decide(collision, self.policy).items():
                if action == "win" and collision.kind == "conflict":
                    winners.append(cases[claim.slot])
                elif action == "lose":
                    losers.append(cases[claim.slot])
                    drop.add(claim.slot)
                elif action == "keep":
                    drop.add(claim.slot)  # an exact duplicate of the winner: edit it once
        kept = [case for slot, case in enumerate(cases) if slot not in drop]
        return kept, winners, losers

    def claims(self, cases: Sequence[EditCase], *, failed: int | None = None) -> str:
        """The claims string for ``cases`` (all requests in ``"hmac"`` mode, failing ones in ``"failures"``)."""
        entries = [(*self.tokens(case), case_timestamp(case)) for case in cases]
        return encode_claims(entries, name=self.name, failed=failed)

    def apply_decisions(self, config: Mapping[str, Any], own_cases: Sequence[EditCase]
                        ) -> tuple[list[EditCase], list[EditCase]]:
        """``(to_reedit, withdrawn)``: the client's own cases the server's decisions name."""
        decisions = parse_decisions(config)
        if not decisions:
            return [], []
        by_tokens: dict[tuple[str, str], EditCase] = {}
        for case in own_cases:
            by_tokens.setdefault(self.tokens(case), case)
        reedit, withdrawn = [], []
        for token, otoken, action in decisions:
            case = by_tokens.get((token, otoken))
            if case is None:
                continue  # not ours (or already gone): nothing to do
            if action == "win":
                reedit.append(case)
            elif action == "lose":
                withdrawn.append(case)
        return reedit, withdrawn

    def requests_for(self, case: EditCase) -> list[EditRequest]:
        """The requests a winner edits: the augmentation of its request, or the request itself."""
        if self.augment is None:
            return [case.request]
        requests = self.augment(case.request)
        return requests or [case.request]


def failing_cases(model, tokenizer, cases: Sequence[EditCase]) -> list[EditCase]:
    """The cases whose edit fails on ``model``: greedy decoding of the edit prompt does not give
    ``target_new`` (some target token is not the strict top-1). The after-the-fact detector."""
    if not cases:
        return []
    from fedke.eval import score_prompt_targets

    scores = score_prompt_targets(model, tokenizer, [c.request.text for c in cases],
                                  [c.request.target_new for c in cases])
    return [case for case, ok in zip(cases, scores.all_top1.tolist()) if not ok]


# ----------------------------------------------------------------------------- augmentation


#: Paraphrase wrappers of a prompt; their words are in the world's vocabulary.
PARAPHRASE_WRAPPERS: tuple[str, ...] = ("In other words , {}", "Indeed , {}", "It is true that {}")


def augment_request(request: EditRequest, *, templates: Sequence[str] = (), related: Sequence[str] = (),
                    wrappers: Sequence[str] = PARAPHRASE_WRAPPERS) -> list[EditRequest]:
    """The request plus augmented copies of the same fact (CollabEdit 4.2.2, "related knowledge"):

    * each of ``templates`` (other prompt templates of the relation, ``"{}"`` for the subject);
    * each paraphrase wrapper applied to the request's prompt (``"In other words , {}"``);
    * each related fact of the subject (a sentence such as ``"Ada Vorn works as a baker ."``)
      as a context before the request's prompt.

    Every copy keeps ``subject``, ``target_new``, ``relation_id`` and ``case_id``; duplicates are
    dropped; the original request comes first.
    """
    prompts = [request.prompt]
    prompts += [t for t in templates]
    prompts += [w.replace("{}", request.prompt, 1) for w in wrappers]
    prompts += [f"{sentence.strip()} {request.prompt}" for sentence in related]
    out, seen = [], set()
    for prompt in prompts:
        if "{}" not in prompt:
            raise ValueError(f"augmented prompt {prompt!r} has no '{{}}' for the subject")
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(replace(request, prompt=prompt))
    return out


def world_augmentation(world, *, n_templates: int | None = None, n_wrappers: int = 2, n_related: int = 2
                       ) -> Callable[[EditRequest], list[EditRequest]]:
    """:func:`augment_request` over a :class:`fedke.data.world.World`: the relation's templates
    (``n_templates`` of them, None: all), ``n_wrappers`` paraphrase wrappers and ``n_related`` of
    the subject's other (true) facts, stated with each relation's first template."""

    def augment(request: EditRequest) -> list[EditRequest]:
        relation = world.relation_by_id.get(request.relation_id)
        templates = list(relation.templates) if relation is not None else []
        if n_templates is not None:
            templates = templates[:n_templates]
        related = []
        for other in world.relations:
            if other.relation_id == request.relation_id or len(related) >= n_related:
                continue
            fact = world.facts.get((request.subject, other.relation_id))
            if fact is not None:
                related.append(f"{other.templates[0].format(request.subject)} {fact} .")
        return augment_request(request, templates=templates, related=related,
                               wrappers=PARAPHRASE_WRAPPERS[:n_wrappers])

    return augment
