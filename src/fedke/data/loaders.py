"""Read and write real knowledge-editing datasets as :class:`~fedke.data.records.EditCase` lists.

Two formats are understood (NOTES.md section 5):

* **CounterFact / Multi-CounterFact** (Meng et al., 2022; 2023): a JSON list of
  ``{case_id, requested_rewrite: {prompt (with "{}"), relation_id, subject, target_new: {str, id},
  target_true: {str, id}}, paraphrase_prompts, neighborhood_prompts, attribute_prompts,
  generation_prompts}``. Parsed record by record with
  :func:`~fedke.data.records.case_from_counterfact`.
* **zsRE** as released with MEND (``zsre_mend_eval.json``): a JSON list of
  ``{subject, src, rephrase, answers, alt, pred, loc, loc_ans, cond}``; see :func:`case_from_zsre`
  for how a record maps onto an :class:`EditCase`.

Every malformed input raises :class:`~fedke.data.records.RecordError` whose message names the file,
the record (its index in the file, and its ``case_id`` where it has one) and the field: invalid
JSON, text that is not UTF-8, nesting deeper than the JSON reader goes, an integer beyond Python's
digit limit, a ``case_id`` that is not an integer or a string, a file that cannot be opened (a
missing one is :class:`~fedke.data.records.DataFileNotFoundError`, also a ``FileNotFoundError``).
With ``skip_invalid=True`` a bad record is skipped (counted in one warning); a file that cannot be
read at all still raises.

:func:`save_counterfact` writes the official CounterFact schema atomically, so a CounterFact file,
a zsRE file or fedke's synthetic world can all be frozen to one format and reloaded.
:func:`iter_text_files` streams plain local text (for covariance statistics over user text).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from fedke.cache import atomic_write_bytes
from fedke.data.records import (
    DataFileNotFoundError,
    EditCase,
    EditRequest,
    RecordError,
    case_from_counterfact,
    check_case_id,
    json_type_name,
    record_name,
)

PathLike = str | os.PathLike

#: Keys fedke adds to a CounterFact record when the official schema cannot hold a case exactly.
#: Official readers ignore unknown keys; :func:`load_counterfact` reads them back.
NEIGHBORHOOD_TARGET_KEY = "neighborhood_target"
EXTRA_KEY = "extra"

_ID_KEYS = ("target_new_id", "target_true_id")
_ZSRE_REQUIRED = ("subject", "src", "rephrase", "answers", "alt", "loc", "loc_ans")


# --------------------------------------------------------------------------------------- reading


class OversizedInt:
    """A JSON integer with more digits than Python converts (``sys.get_int_max_str_digits()``).

    :func:`parse_json` keeps it as this marker instead of failing the whole file, so that the
    record holding it can be named (and skipped with ``skip_invalid``); :func:`find_oversized_int`
    finds it.
    """

    __slots__ = ("digits",)
    json_type_name = "integer beyond Python's digit limit"

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | OversizedInt:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        return OversizedInt(len(text.lstrip("-")))


def parse_json(raw: bytes | str, where: str) -> Any:
    """The JSON value of a user's data file's contents; RecordError naming ``where`` if it cannot be read.

    Covers invalid JSON (line and column), text that is not UTF-8, and nesting deeper than the
    reader's recursion limit. Integers beyond Python's digit limit come back as
    :class:`OversizedInt` markers (see :func:`oversized_int_error`), not as an error for the file.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as err:
        raise RecordError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise RecordError(f"{where}: JSON nested too deeply to read (arrays or objects more than about "
                          f"{sys.getrecursionlimit()} levels deep)") from None
    except (ValueError, MemoryError) as err:
        raise RecordError(f"{where}: unreadable JSON ({type(err).__name__}: {err})") from None


def read_data_file(path: Path) -> bytes:
    """The bytes of a user's data file; RecordError naming it if it cannot be read
    (:class:`DataFileNotFoundError`, also a FileNotFoundError, when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: no such data file") from None
    except OSError as err:
        raise RecordError(f"{path}: cannot be read ({err.strerror or err})") from None


def find_oversized_int(value: Any) -> tuple[str, OversizedInt] | None:
    """The first :class:`OversizedInt` in a parsed JSON value, with its field path
    (``requested_rewrite.target_new.id``, ``answers[2]``), None if there is none. Iterative: a
    deeply nested value cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, OversizedInt):
            return where, item
        if isinstance(item, dict):
            children = [(f"{where}.{key}" if where else str(key), child) for key, child in item.items()]
        elif isinstance(item, list):
            children = [(f"{where}[{i}]", child) for i, child in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))
    return None


def oversized_int_error(value: Any) -> RecordError | None:
    """A RecordError naming the field of ``value`` that holds an :class:`OversizedInt`, None if none does."""
    found = find_oversized_int(value)
    if found is None:
        return None
    where, number = found
    return RecordError(f"field {where or '(the value itself)'!r}: an integer of {number.digits} digits, more than "
                       f"Python converts ({sys.get_int_max_str_digits()})")


def _read_json_list(path: Path) -> list[Any]:
    """The top-level JSON list of ``path``; RecordError naming the file for anything else."""
    data = parse_json(read_data_file(path), str(path))
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records at the top level, got {json_type_name(data)}")
    return data


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def _parse_records(path: Path, records: list[Any], parse, *, limit: int | None,
                   skip_invalid: bool) -> list[EditCase]:
    """Parse ``records`` with ``parse(record, index)``, prefixing errors with the file name.

    Stops after ``limit`` cases. With ``skip_invalid`` malformed records are dropped with one
    warning (their count, and the first few named) instead of raising. Whatever goes wrong with a
    record (an integer beyond Python's digit limit, a ``case_id`` that is a list) is a RecordError
    naming the file, the record's index and the field. Duplicate ``case_id`` values are an error:
    per-case results are keyed by them.
    """
    cases: list[EditCase] = []
    seen: dict[Any, int] = {}
    skipped: list[str] = []
    for index, record in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        try:
            oversized = oversized_int_error(record)
            if oversized is not None:
                raise oversized
            case = parse(record, index)
            check_case_id(case.case_id, "the parsed case")
            if case.case_id in seen:
                raise RecordError(f"duplicate case_id {case.case_id!r} (first used by record #{seen[case.case_id]})")
        except RecordError as err:
            message = f"{path}: record #{index}: {err}"
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as err:
            # a record no check above foresaw: still named, still skippable
            message = f"{path}: record #{index}: malformed ({type(err).__name__}: {err})"
        else:
            seen[case.case_id] = index
            cases.append(case)
            continue
        if not skip_invalid:
            raise RecordError(message) from None
        skipped.append(message)
    if skipped:
        shown = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} malformed record(s): {shown}", stacklevel=3)
    return cases


def _nonempty_target(value: Any, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: {field_name} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise RecordError(f"{where}: empty {field_name}")
    return value


def _counterfact_case(record: Any, index: int) -> EditCase:
    """One CounterFact record as an EditCase, plus fedke's optional extension keys."""
    if isinstance(record, Mapping) and isinstance(record.get("requested_rewrite"), Mapping):
        # checked before case_from_counterfact, which expects target_true to be an object
        where = f"CounterFact record {record_name(record, index)!r}"
        target_true = record["requested_rewrite"].get("target_true")
        if not isinstance(target_true, Mapping) or "str" not in target_true:
            raise RecordError(f"{where}: missing field 'target_true' (an object with a 'str')")
        _nonempty_target(target_true["str"], "target_true", where)
    case = case_from_counterfact(record, index)
    where = f"CounterFact record {case.case_id!r}"
    changes: dict[str, Any] = {}
    if NEIGHBORHOOD_TARGET_KEY in record:
        changes["neighborhood_target"] = _nonempty_target(record[NEIGHBORHOOD_TARGET_KEY],
                                                          NEIGHBORHOOD_TARGET_KEY, where)
    if EXTRA_KEY in record:
        if not isinstance(record[EXTRA_KEY], Mapping):
            raise RecordError(f"{where}: {EXTRA_KEY} must be a JSON object")
        changes["extra"] = dict(record[EXTRA_KEY])
    return replace(case, **changes) if changes else case


def load_counterfact(path: PathLike, *, limit: int | None = None,
                     skip_invalid: bool = False) -> list[EditCase]:
    """Load a CounterFact / Multi-CounterFact JSON file (official schema, NOTES.md section 5).

    Args:
        path: the JSON file (a list of records).
        limit: keep only the first ``limit`` cases (``None``: all).
        skip_invalid: drop malformed records with a warning instead of raising.

    Each case's ``neighborhood_target`` is its ``target_true`` (CounterFact's neighbourhood
    prompts share the edited fact's true object), unless the record carries fedke's
    ``"neighborhood_target"`` extension key written by :func:`save_counterfact`.

    Raises:
        RecordError: a file that cannot be read (missing: DataFileNotFoundError), invalid or
            too deeply nested JSON, a top level that is not a list, a record missing a field, a
            subject not in its prompt, an empty ``target_new`` / ``target_true``, a ``case_id``
            that is not an integer or a string, or a duplicate one, an integer beyond Python's
            digit limit. The message names the file, the record index, the case and the field.
    """
    _check_limit(limit)
    path = Path(path)
    return _parse_records(path, _read_json_list(path), _counterfact_case, limit=limit,
                          skip_invalid=skip_invalid)


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def zsre_neighborhood_prompt(loc: str) -> str:
    """The neighbourhood prompt for a zsRE ``loc`` question, as MEMIT's zsRE evaluation builds it.

    The official ``loc`` reads ``"nq question: who played desmond doss father in hacksaw ridge"``
    (no question mark). MEMIT (``dsets/zsre.py``) keeps the ``"nq question: "`` prefix and appends
    ``"?"`` before the answer tokens; we do the same, without doubling a ``"?"`` already there.
    """
    loc = loc.rstrip()
    return loc if loc.endswith("?") else loc + "?"


def case_from_zsre(record: Any, index: int, *, target_new_from: Literal["alt", "answers"] = "alt") -> EditCase:
    """One zsRE (``zsre_mend_eval.json``) record as an :class:`EditCase`; ``case_id`` = ``index``.

    Mapping (official record ``{subject, src, rephrase, answers, alt, pred, loc, loc_ans, cond}``):

    * request prompt: ``src`` with the first occurrence of ``subject`` replaced by ``"{}"`` (other
      braces escaped so ``prompt.format(subject) == src``). ``src`` is used as is: in the official
      file it is already a question ending in ``"?"`` (``"What university did Watts Humphrey
      attend?"``), which is also what MEMIT evaluates on.
    * ``target_new`` = ``alt`` (the MEND edit target) and ``target_true`` = ``answers[0]``.
      With ``target_new_from="answers"`` the request instead asks for ``answers[0]`` as MEMIT's
      zsRE loader does (it has no true object; we then use ``pred``, the base QA model's answer, as
      ``target_true``, falling back to ``alt``).
    * ``paraphrase_prompts`` = ``(rephrase,)``.
    * ``neighborhood_prompts`` = ``(zsre_neighborhood_prompt(loc),)`` with
      ``neighborhood_target`` = ``loc_ans``.
    * ``extra``: ``pred``, ``cond``, all ``answers`` and the raw ``loc`` (when present).
    """
    where = f"zsRE record {index}"
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {json_type_name(record)}")
    missing = [name for name in _ZSRE_REQUIRED if name not in record]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    subject, src = record["subject"], record["src"]
    for name in ("subject", "src", "rephrase", "loc"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise RecordError(f"{where}: field {name!r} must be a non-empty string")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers:
        raise RecordError(f"{where}: field 'answers' must be a non-empty list of strings")
    answer = _nonempty_target(answers[0], "answers[0]", where)
    alt = _nonempty_target(record["alt"], "alt", where)
    loc_ans = _nonempty_target(record["loc_ans"], "loc_ans", where)
    at = src.find(subject)
    if at < 0:
        raise RecordError(f"{where}: field 'subject' {subject!r} is not in its 'src' {src!r}")
    prompt = _escape_braces(src[:at]) + "{}" + _escape_braces(src[at + len(subject):])
    if target_new_from == "alt":
        target_new, target_true = alt, answer
    elif target_new_from == "answers":
        pred = record.get("pred")
        target_new = answer
        target_true = pred.strip() if isinstance(pred, str) and pred.strip() and pred.strip() != answer else alt
    else:
        raise ValueError(f"target_new_from must be 'alt' or 'answers', got {target_new_from!r}")
    extra = {name: record[name] for name in ("pred", "cond") if name in record}
    extra["answers"] = list(answers)
    extra["loc"] = record["loc"]
    try:
        request = EditRequest(prompt, subject, target_new, "", target_true, index)
    except RecordError as err:
        raise RecordError(f"{where}: {err}") from None
    return EditCase(
        case_id=index,
        request=request,
        paraphrase_prompts=(record["rephrase"],),
        neighborhood_prompts=(zsre_neighborhood_prompt(record["loc"]),),
        neighborhood_target=loc_ans,
        extra=extra,
    )


def load_zsre(path: PathLike, *, limit: int | None = None, skip_invalid: bool = False,
              target_new_from: Literal["alt", "answers"] = "alt") -> list[EditCase]:
    """Load zsRE in MEND's format (``zsre_mend_eval.json``); see :func:`case_from_zsre` for the mapping.

    Args:
        path: the JSON file (a list of records).
        limit: keep only the first ``limit`` cases (``None``: all).
        skip_invalid: drop malformed records with a warning instead of raising.
        target_new_from: ``"alt"`` (default, MEND's edit target) or ``"answers"`` (MEMIT's choice).

    Raises:
        RecordError: a file that cannot be read (missing: DataFileNotFoundError), invalid or
            too deeply nested JSON, a top level that is not a list, a record missing a field, a
            subject not in its ``src``, an empty target (``alt``, ``answers[0]``, ``loc_ans``), an
            integer beyond Python's digit limit.
    """
    _check_limit(limit)
    path = Path(path)

    def parse(record: Any, index: int) -> EditCase:
        return case_from_zsre(record, index, target_new_from=target_new_from)

    return _parse_records(path, _read_json_list(path), parse, limit=limit, skip_invalid=skip_invalid)


# --------------------------------------------------------------------------------------- writing


def counterfact_record(case: EditCase) -> dict[str, Any]:
    """``case`` as an official CounterFact record, plus fedke's extension keys where needed.

    ``"neighborhood_target"`` is added when it differs from ``target_true`` (zsRE cases), and
    ``"extra"`` when ``case.extra`` holds more than the two target ids the schema has room for,
    so that :func:`load_counterfact` returns an equal case.
    """
    where = f"case {case.case_id!r}"
    if case.request.target_true is None or not case.request.target_true.strip():
        raise RecordError(f"{where}: no target_true; the CounterFact schema requires one")
    record = case.to_counterfact()
    if case.neighborhood_target is not None and case.neighborhood_target != case.request.target_true:
        record[NEIGHBORHOOD_TARGET_KEY] = case.neighborhood_target
    if set(case.extra) - set(_ID_KEYS):
        record[EXTRA_KEY] = dict(case.extra)
    return record


def save_counterfact(cases: Iterable[EditCase], path: PathLike) -> None:
    """Write ``cases`` to ``path`` as a CounterFact JSON list, atomically (temp file + os.replace).

    Raises:
        RecordError: a case without ``target_true``, a duplicate ``case_id``, or ``extra`` values
            that are not JSON-serialisable (the message names the case).
    """
    records: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for case in cases:
        if case.case_id in seen:
            raise RecordError(f"case {case.case_id!r}: duplicate case_id")
        seen.add(case.case_id)
        record = counterfact_record(case)
        try:
            json.dumps(record)
        except (TypeError, ValueError) as err:
            raise RecordError(f"case {case.case_id!r}: not JSON-serialisable: {err}") from None
        records.append(record)
    data = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, data.encode("utf-8"))


# ------------------------------------------------------------------------------------ plain text


def _expand_text_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """``paths`` as a list of files; a directory stands for its ``*.txt`` files (recursive, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file not found: {path}")
    return files


def _iter_units(path: Path, unit: str, encoding: str) -> Iterator[str]:
    with open(path, encoding=encoding, errors="replace") as handle:
        if unit == "line":
            for line in handle:
                line = line.strip()
                if line:
                    yield line
            return
        paragraph: list[str] = []
        for line in handle:
            line = line.strip()
            if line:
                paragraph.append(line)
            elif paragraph:
                yield " ".join(paragraph)
                paragraph = []
        if paragraph:
            yield " ".join(paragraph)


def iter_text_files(paths: PathLike | Sequence[PathLike], *,
                    unit: Literal["paragraph", "line"] = "paragraph",
                    encoding: str = "utf-8") -> Iterator[str]:
    """Stream the non-empty paragraphs (or lines) of plain local text files, in order.

    Args:
        paths: one path or several; a directory stands for all ``*.txt`` files under it.
        unit: ``"paragraph"`` (blank-line separated, inner newlines joined by a space) or ``"line"``.
        encoding: file encoding; undecodable bytes are replaced, never fatal.

    Every path is checked before anything is read, so a missing file fails at once with a
    FileNotFoundError naming it (not after hours of statistics over the files before it).
    """
    if unit not in ("paragraph", "line"):
        raise ValueError(f"unit must be 'paragraph' or 'line', got {unit!r}")
    files = _expand_text_paths(paths)

    def generate() -> Iterator[str]:
        for path in files:
            yield from _iter_units(path, unit, encoding)

    return generate()
