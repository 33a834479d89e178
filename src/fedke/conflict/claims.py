"""The claims a client sends with its payload (a JSON string in its fit metrics), encoded and
decoded with every field checked; see :mod:`fedke.conflict`."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from .tokens import _TOKEN_RE, MAX_CLAIMS, MAX_CLAIMS_CHARS, TOKEN_HEX


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
