"""Server side: colliding claims, the resolution policies (FCFS, FIFO, client priority), the
conflict coordinator that records claims and decides, and detection scores; it sees tokens only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from .claims import decode_claims
from .tokens import _TOKEN_RE, CLAIMS_KEY, DECISIONS_KEY


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


# ----------------------------------------------------------------------------- measuring detection


def detection_scores(predicted: Iterable[Any], truth: Iterable[Any]) -> dict[str, float]:
    """Precision and recall of a set of flagged items against the true set (1.0 when both are empty)."""
    predicted, truth = set(predicted), set(truth)
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else (1.0 if not truth else 0.0)
    recall = hits / len(truth) if truth else 1.0
    return {"precision": precision, "recall": recall, "flagged": len(predicted), "true": len(truth)}
