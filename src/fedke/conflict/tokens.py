"""Keyed request tokens and the federation secret (client side): HMAC-SHA256 of the normalised
subject, relation and object under a secret the server never holds; see :mod:`fedke.conflict`."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from typing import Mapping

from fedke.data.records import EditRequest


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
