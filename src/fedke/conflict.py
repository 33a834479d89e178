"""Knowledge conflict among clients: detect it privately, resolve it in two stages (CollabEdit 4.2.2).

A *conflict* is two edit requests with the same subject and relation but different new objects
in the same round; an *overlap* is the same request (same object) made twice. The paper's
remedy has two stages:

1. **Detect**, without the server learning what anyone asked for. Two modes:

   * ``"hmac"`` (before the merge). Each client derives, for every request it sends, two keyed
     hashes with a *federation secret* that the clients share and the server never holds::

         token        = HMAC-SHA256(secret, "fedke/sr/v1"  | norm(subject) | norm(relation))[:128 bits]
         object_token = HMAC-SHA256(secret, "fedke/sro/v1" | norm(subject) | norm(relation) | norm(object))[:128 bits]

     and sends the list ``(token, object_token, timestamp)`` with its payload (fit metrics key
     :data:`CLAIMS_KEY`). Equal tokens from two requests mean the same (subject, relation):
     equal object tokens too is an overlap, different ones a conflict.
   * ``"failures"`` (after the fact). After a merge each client evaluates its own earlier
     requests on the merged model and reports how many fail (the target is not the top-1
     answer of the edit prompt) and the tokens of those failing requests only.

2. **Resolve.** The server's :class:`ConflictCoordinator` groups colliding claims and a
   pluggable :class:`ResolutionPolicy` (:class:`FCFS` by request timestamp, :class:`FIFO` by
   arrival at the server, :class:`ClientPriority` from a list) picks the winning object. The next
   round's fit config tells each involved client, and only it, which of its own claims won or
   lost (by token). Losers withdraw theirs: they do not edit or report it again (what they sent
   is already merged; nothing is rolled back). The winner re-edits its request with augmentation
   (:func:`augment_request`: more templates, paraphrases and the subject's related facts) against
   the merged model, which overwrites the conflicted fact (a later edit overwrites an earlier one,
   CollabEdit footnote 1).

What each mode reveals
----------------------
* To the **server**, ``"hmac"`` reveals per client and round: the number of requests, one opaque
  128-bit token per request (and one per request+object), the request timestamps, and hence
  which requests of which clients share a (subject, relation) and whether they agree on the
  object. Without the secret a token is a pseudo-random function value: it does not contain or
  determine the text, and the server cannot test guesses. It does learn *linkage*: the same
  fact asked again, by anyone, in any round gives the same token (the price of matching).
* ``"failures"`` reveals less: per client and round the number of its requests failing on the
  merged model, and the tokens of those failing requests only (nothing about the others).
* To **other clients** (who hold the secret) the decisions they receive reveal nothing new:
  each client is told only about its own tokens. But a client that sees another client's token
  could test guesses of (subject, relation), so tokens go to the server only; the secret must be
  kept off the server machine (see :func:`load_secret`).
* The ``"off"`` mode sends no token.

The server-side parts (:class:`ConflictCoordinator`, the policies) see tokens only; the
client-side parts (:class:`ConflictAgent`, :func:`augment_request`) see requests and never
leave the client. Nothing here holds module-level state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from fedke.data.records import EditCase, EditRequest

__all__ = [
    "CLAIMS_KEY",
    "DECISIONS_KEY",
    "DETECTION_MODES",
    "POLICIES",
    "SECRET_ENV",
    "Claim",
    "ClientPriority",
    "Collision",
    "ConflictAgent",
    "ConflictCoordinator",
    "FCFS",
    "FIFO",
    "ResolutionPolicy",
    "augment_request",
    "conflict_token",
    "decode_claims",
    "detection_scores",
    "encode_claims",
    "failing_cases",
    "find_collisions",
    "load_secret",
    "make_policy",
    "normalise_text",
    "object_token",
    "world_augmentation",
]

#: Fit-metrics key of a client's claims (a JSON string, see :func:`encode_claims`).
CLAIMS_KEY = "fedke.conflict.claims"
#: Fit-config key of the decisions about one client's own claims (a JSON string).
DECISIONS_KEY = "fedke.conflict.decisions"
#: Environment variable holding the federation secret on client machines.
SECRET_ENV = "FEDKE_FEDERATION_SECRET"
DETECTION_MODES = ("off", "hmac", "failures")
TOKEN_HEX = 32  # 128 bits of HMAC-SHA256
MIN_SECRET_BYTES = 16
MAX_CLAIMS = 100_000
#: The longest claims string accepted (a claim is about 80 characters of JSON).
MAX_CLAIMS_CHARS = 200 * MAX_CLAIMS
_TOKEN_RE = re.compile(rf"^[0-9a-f]{{{TOKEN_HEX}}}$")


# ----------------------------------------------------------------------------- tokens (client side)


def normalise_text(text: str) -> str:
    """Unicode NFKC, case-folded, inner whitespace collapsed, outer whitespace and a trailing
    full stop dropped: ``"  Ada  VORN. "`` and ``"ada vorn"`` normalise alike."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split()).rstrip(".").strip()


def _relation_of(request: EditRequest) -> str:
    """The relation a request edits: its ``relation_id``, else its prompt template (zsRE has no id)."""
    return request.relation_id if request.relation_id and request.relation_id.strip() else request.prompt


def _field(text: str) -> bytes:
    """One length-prefixed field, so no two different tuples encode to the same bytes."""
    data = normalise_text(text).encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"the federation secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the federation secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return bytes(secret)


def conflict_token(secret: bytes, subject: str, relation: str) -> str:
    """``HMAC-SHA256(secret, "fedke/sr/v1" | norm(subject) | norm(relation))``, first 128 bits, hex."""
    message = b"fedke/sr/v1" + _field(subject) + _field(relation)
    return hmac.new(_check_secret(secret), message, hashlib.sha256).hexdigest()[:TOKEN_HEX]


def object_token(secret: bytes, subject: str, relation: str, obj: str) -> str:
    """``HMAC-SHA256(secret, "fedke/sro/v1" | norm(subject) | norm(relation) | norm(object))``, 128 bits, hex."""
    message = b"fedke/sro/v1" + _field(subject) + _field(relation) + _field(obj)
    return hmac.new(_check_secret(secret), message, hashlib.sha256).hexdigest()[:TOKEN_HEX]


def request_tokens(secret: bytes, request: EditRequest) -> tuple[str, str]:
    """``(token, object_token)`` of one edit request."""
    relation = _relation_of(request)
    return (conflict_token(secret, request.subject, relation),
            object_token(secret, request.subject, relation, request.target_new))


def load_secret(value: str | bytes | None = None, *, env: Mapping[str, str] | None = None) -> bytes | None:
    """The federation secret: ``value`` if given and non-empty, else ``$FEDKE_FEDERATION_SECRET``.

    Where to put it: in a deployment, set ``FEDKE_FEDERATION_SECRET`` (at least 16 bytes, e.g.
    ``openssl rand -hex 32``) in the environment of every SuperNode, or pass the SuperNode node
    config key ``federation-secret``; never on the SuperLink / ServerApp machine. The run-config
    key ``conflict-secret`` exists for simulations only: Flower sends the run config to the
    ServerApp too, so a secret there is known to the server. Returns None when none is set.
    """
    if isinstance(value, (bytes, bytearray)):
        return _check_secret(bytes(value)) if value else None
    if value:
        return _check_secret(str(value).encode("utf-8"))
    environ = os.environ if env is None else env
    text = environ.get(SECRET_ENV, "")
    return _check_secret(text.encode("utf-8")) if text else None


# ----------------------------------------------------------------------------- wire format


def encode_claims(tokens: Sequence[tuple[str, str, float]], *, name: str = "", failed: int | None = None) -> str:
    """A client's claims as the JSON string sent in fit metrics (:data:`CLAIMS_KEY`).

    ``tokens``: ``(token, object_token, timestamp)`` per claimed request; ``name``: the client's
    self-declared name (for :class:`ClientPriority`); ``failed``: the count of its requests failing
    on the merged model (after-the-fact mode).
    """
    body: dict[str, Any] = {"v": 1, "name": str(name), "claims": [[t, o, float(ts)] for t, o, ts in tokens]}
    if failed is not None:
        body["failed"] = int(failed)
    return json.dumps(body, separators=(",", ":"))


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def decode_claims(text: Any) -> dict[str, Any]:
    """Parse and validate :func:`encode_claims`' string; ValueError naming what is wrong.

    Returns ``{"name": str, "claims": [(token, object_token, timestamp)], "failed": int | None}``.
    Only ValueError is raised, whatever the input (deep nesting, huge strings, NaN included).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="strict")
    if not isinstance(text, str):
        raise ValueError(f"claims must be a JSON string, got {type(text).__name__}")
    if len(text) > MAX_CLAIMS_CHARS:
        raise ValueError(f"claims are {len(text)} characters long, more than the {MAX_CLAIMS_CHARS} allowed")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("claims are JSON nested too deeply to decode") from None
    except ValueError as error:  # JSONDecodeError, NaN / Infinity, integers too long to convert
        raise ValueError(f"claims are not valid JSON: {error}") from None
    if not isinstance(body, dict) or body.get("v") != 1:
        raise ValueError("claims must be an object with v = 1")
    raw = body.get("claims", [])
    if not isinstance(raw, list) or len(raw) > MAX_CLAIMS:
        raise ValueError(f"claims must be a list of at most {MAX_CLAIMS} entries")
    claims = []
    for index, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError(f"claim {index}: expected [token, object_token, timestamp]")
        token, otoken, timestamp = entry
        for what, value in (("token", token), ("object_token", otoken)):
            if not (isinstance(value, str) and _TOKEN_RE.match(value)):
                raise ValueError(f"claim {index}: {what} must be {TOKEN_HEX} lowercase hex characters")
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
            raise ValueError(f"claim {index}: timestamp must be a finite number")
        claims.append((token, otoken, float(timestamp)))
    failed = body.get("failed")
    if failed is not None and (isinstance(failed, bool) or not isinstance(failed, int) or not 0 <= failed <= MAX_CLAIMS):
        raise ValueError(f"failed must be an integer in [0, {MAX_CLAIMS}]")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise ValueError("name must be a string of at most 200 characters")
    return {"name": name, "claims": claims, "failed": failed}


# ----------------------------------------------------------------------------- collisions and policies


@dataclass(frozen=True)
class Claim:
    """One client's claim on a (subject, relation), as the server sees it: tokens, no text.

    ``client`` routes decisions back (Flower's client id); ``name`` is the client's declared name
    (priority lists use it); ``arrival`` is the server's arrival counter of the reply.
    """

    client: str
    name: str
    server_round: int
    token: str
    object_token: str
    timestamp: float
    arrival: int
    slot: int = 0


@dataclass(frozen=True)
class Collision:
    """Claims sharing a token: ``kind`` is ``"conflict"`` (objects differ) or ``"overlap"``."""

    token: str
    claims: tuple[Claim, ...]

    @property
    def kind(self) -> str:
        return "conflict" if len({c.object_token for c in self.claims}) > 1 else "overlap"

    @property
    def cross_client(self) -> bool:
        return len({c.client for c in self.claims}) > 1


def find_collisions(claims: Iterable[Claim]) -> list[Collision]:
    """Groups of two or more claims with the same token (within or across clients), in token order."""
    groups: dict[str, list[Claim]] = {}
    for claim in claims:
        groups.setdefault(claim.token, []).append(claim)
    return [Collision(token, tuple(group)) for token, group in sorted(groups.items()) if len(group) > 1]


@runtime_checkable
class ResolutionPolicy(Protocol):
    """Picks the winning claim of a conflict; deterministic for the same claims."""

    name: str

    def choose(self, claims: Sequence[Claim]) -> Claim: ...


def _tie_break(claim: Claim) -> tuple:
    return (claim.server_round, claim.arrival, claim.client, claim.slot, claim.object_token)


@dataclass(frozen=True)
class FCFS:
    """First come, first served (Zhao & Stankovic, 1989): the request with the earliest timestamp wins."""

    name: str = "fcfs"

    def choose(self, claims: Sequence[Claim]) -> Claim:
        if not claims:
            raise ValueError("no claims to choose from")
        return min(claims, key=lambda c: (c.timestamp, *_tie_break(c)))


@dataclass(frozen=True)
class FIFO:
    """First in, first out (Morse & Richardson, 1983): the claim that reached the server first wins."""

    name: str = "fifo"

    def choose(self, claims: Sequence[Claim]) -> Claim:
        if not claims:
            raise ValueError("no claims to choose from")
        return min(claims, key=_tie_break)


@dataclass(frozen=True)
class ClientPriority:
    """The client ranked highest in ``order`` (by declared name, else client id) wins; clients not
    listed rank after every listed one; ties fall back to :class:`FIFO`."""

    order: tuple[str, ...] = ()
    name: str = "priority"

    def __post_init__(self) -> None:
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"client priority list names a client twice: {list(self.order)}")

    def rank(self, claim: Claim) -> int:
        for key in (claim.name, claim.client):
            if key in self.order:
                return self.order.index(key)
        return len(self.order)

    def choose(self, claims: Sequence[Claim]) -> Claim:
        if not claims:
            raise ValueError("no claims to choose from")
        return min(claims, key=lambda c: (self.rank(c), *_tie_break(c)))


POLICIES: dict[str, Callable[..., ResolutionPolicy]] = {
    "fcfs": lambda priority=(): FCFS(),
    "fifo": lambda priority=(): FIFO(),
    "priority": lambda priority=(): ClientPriority(tuple(priority)),
}


def make_policy(name: str | ResolutionPolicy, priority: Sequence[str] | str = ()) -> ResolutionPolicy:
    """A policy by name (``fcfs``, ``fifo``, ``priority``); ``priority`` is a list or a comma-separated string."""
    if isinstance(name, ResolutionPolicy) and not isinstance(name, str):
        return name
    key = str(name).strip().lower()
    if key not in POLICIES:
        raise ValueError(f"unknown conflict policy {name!r}; valid: {', '.join(POLICIES)}")
    if isinstance(priority, str):
        priority = [p.strip() for p in priority.split(",") if p.strip()]
    return POLICIES[key](priority=tuple(priority))


def decide(collision: Collision, policy: ResolutionPolicy) -> dict[Claim, str]:
    """``"win"`` for the policy's choice, ``"keep"`` for other claims of the same object (overlaps
    of the winner: nothing to do), ``"lose"`` for every claim of another object."""
    winner = policy.choose(collision.claims)
    out = {}
    for claim in collision.claims:
        if claim == winner:
            out[claim] = "win"
        else:
            out[claim] = "keep" if claim.object_token == winner.object_token else "lose"
    return out


# ----------------------------------------------------------------------------- server side


class ConflictCoordinator:
    """The server's conflict desk: collects claims, finds collisions, stages per-client decisions.

    A strategy calls :meth:`observe` (or :meth:`read_claims` before merging and :meth:`record` once
    merged) for every accepted reply of a round, :meth:`end_round` once
    after the merge (its metrics go into the round's metrics) and :meth:`fit_config` per client
    when configuring the next round. It sees tokens, timestamps and counts only.

    Parameters
    ----------
    policy : ResolutionPolicy | str (default: "fcfs")
        Who wins a conflict.
    priority : Sequence[str] | str (default: ())
        Client order for ``policy="priority"``.
    resolve : bool (default: True)
        False: detect and report only, send no decisions.
    """

    def __init__(self, policy: ResolutionPolicy | str = "fcfs", *, priority: Sequence[str] | str = (),
                 resolve: bool = True) -> None:
        self.policy = make_policy(policy, priority)
        self.resolve = bool(resolve)
        self._round_claims: list[Claim] = []
        self._failed: dict[str, int] = {}
        self._arrival = 0
        self._pending: dict[str, list[list[str]]] = {}
        self._resolved: set[str] = set()
        #: Every collision found, per round (for reports and tests).
        self.history: list[tuple[int, list[Collision]]] = []
        #: Every decision sent: (round decided, claim, action).
        self.decisions: list[tuple[int, Claim, str]] = []

    def observe(self, server_round: int, client: str, metrics: Mapping[str, Any] | None) -> int:
        """Record one reply's claims (if any); returns how many. Malformed claims raise a ValueError
        naming the client and record nothing (:meth:`read_claims` then :meth:`record`)."""
        try:
            body = self.read_claims(metrics)
        except ValueError as error:
            self._arrival += 1
            raise ValueError(f"client {client}: {error}") from None
        return self.record(server_round, client, body)

    def read_claims(self, metrics: Any) -> dict[str, Any] | None:
        """The decoded claims of one reply's fit metrics (:func:`decode_claims`), None without any.

        Raises ValueError naming the metrics key when they are malformed (a strategy rejects that
        reply before merging it); changes nothing.
        """
        if metrics is None:
            return None
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics: expected a dict, got {type(metrics).__name__}")
        if CLAIMS_KEY not in metrics:
            return None
        try:
            return decode_claims(metrics[CLAIMS_KEY])
        except ValueError as error:
            raise ValueError(f"metrics[{CLAIMS_KEY!r}]: {error}") from None

    def record(self, server_round: int, client: str, body: Mapping[str, Any] | None) -> int:
        """Record claims :meth:`read_claims` returned for an accepted reply (None: none); returns how many."""
        self._arrival += 1
        if body is None:
            return 0
        name = body["name"] or str(client)
        for slot, (token, otoken, timestamp) in enumerate(body["claims"]):
            self._round_claims.append(Claim(str(client), name, int(server_round), token, otoken, timestamp,
                                            self._arrival, slot))
        if body["failed"] is not None:
            self._failed[str(client)] = self._failed.get(str(client), 0) + body["failed"]
        return len(body["claims"])

    def end_round(self, server_round: int) -> dict[str, float]:
        """Find this round's collisions, stage decisions for the next round, return the metrics."""
        claims, self._round_claims = self._round_claims, []
        failed, self._failed = self._failed, {}
        collisions = [c for c in find_collisions(claims) if c.token not in self._resolved]
        self.history.append((int(server_round), collisions))
        conflicts = [c for c in collisions if c.kind == "conflict"]
        overlaps = [c for c in collisions if c.kind == "overlap"]
        if self.resolve:
            for collision in conflicts:
                for claim, action in decide(collision, self.policy).items():
                    self._pending.setdefault(claim.client, []).append([claim.token, claim.object_token, action])
                    self.decisions.append((int(server_round), claim, action))
                self._resolved.add(collision.token)
        metrics = {
            "conflict_claims": len(claims),
            "conflict_collisions": len(conflicts),
            "conflict_requests": sum(len(c.claims) for c in conflicts),
            "conflict_cross_client": sum(1 for c in conflicts if c.cross_client),
            "overlap_collisions": len(overlaps),
            "overlap_requests": sum(len(c.claims) for c in overlaps),
        }
        if failed:
            metrics["failed_requests_reported"] = sum(failed.values())
            metrics["clients_reporting_failures"] = sum(1 for v in failed.values() if v > 0)
        return metrics

    def fit_config(self, client: str) -> dict[str, str]:
        """The decisions about ``client``'s own claims (once), as ``{DECISIONS_KEY: json}``; ``{}`` if none."""
        pending = self._pending.pop(str(client), None)
        if not pending:
            return {}
        return {DECISIONS_KEY: json.dumps(pending, separators=(",", ":"))}

    def collisions(self) -> list[Collision]:
        return [c for _, cs in self.history for c in cs]


def parse_decisions(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The ``(token, object_token, action)`` decisions in a fit config ([] if none); ValueError if malformed."""
    text = config.get(DECISIONS_KEY)
    if not text:
        return []
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"malformed conflict decisions: {error}") from None
    out = []
    for entry in raw if isinstance(raw, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 3 and entry[2] in ("win", "lose", "keep")
                and all(isinstance(x, str) and _TOKEN_RE.match(x) for x in entry[:2])):
            raise ValueError(f"malformed conflict decision {entry!r}")
        out.append((entry[0], entry[1], entry[2]))
    return out


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


# ----------------------------------------------------------------------------- measuring detection


def detection_scores(predicted: Iterable[Any], truth: Iterable[Any]) -> dict[str, float]:
    """Precision and recall of a set of flagged items against the true set (1.0 when both are empty)."""
    predicted, truth = set(predicted), set(truth)
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else (1.0 if not truth else 0.0)
    recall = hits / len(truth) if truth else 1.0
    return {"precision": precision, "recall": recall, "flagged": len(predicted), "true": len(truth)}
