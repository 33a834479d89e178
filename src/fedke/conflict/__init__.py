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

from .agent import ConflictAgent, augment_request, case_timestamp, failing_cases, world_augmentation
from .claims import decode_claims, encode_claims
from .resolution import (POLICIES, FCFS, FIFO, Claim, ClientPriority, Collision, ConflictCoordinator, ResolutionPolicy,
                         decide, detection_scores, find_collisions, make_policy, parse_decisions)
from .tokens import (CLAIMS_KEY, DECISIONS_KEY, DETECTION_MODES, SECRET_ENV, conflict_token, load_secret,
                     normalise_text, object_token, request_tokens)
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
