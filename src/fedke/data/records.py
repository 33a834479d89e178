"""The one record type every fedke pipeline speaks: an edit case in the CounterFact schema.

A CounterFact record (Meng et al., 2022) looks like::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "{} lives in", "relation_id": "P551", "subject": "Ada Vorn",
                           "target_new": {"str": "Kelmar", "id": "Q1"},
                           "target_true": {"str": "Dusso", "id": "Q2"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "attribute_prompts": [...], "generation_prompts": [...]}

fedke's synthetic world emits exactly this, and the CounterFact / zsRE loaders turn real files
into the same :class:`EditCase`, so editing and evaluation never care where a case came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class RecordError(ValueError):
    """A data file or record that cannot be read: the message names the file, the record and the field.

    Every failure reading a user's data file (CounterFact, zsRE, a fact table) is one of these.
    """


class DataFileNotFoundError(RecordError, FileNotFoundError):
    """A data file that does not exist: a :class:`RecordError` like every other failure reading
    one, and still the ``FileNotFoundError`` that callers caught before."""


def json_type_name(value: Any) -> str:
    """How a JSON value's type reads in an error message (``list``, ``dict``, ``str``, ``int``...)."""
    return getattr(value, "json_type_name", type(value).__name__)


def check_case_id(case_id: Any, where: str) -> int | str:
    """``case_id`` if it is an integer (not a boolean) or a string; RecordError naming the field otherwise.

    Per-case results are keyed by it, so it must be hashable and print as itself.
    """
    if isinstance(case_id, bool) or not isinstance(case_id, (int, str)):
        raise RecordError(f"{where}: field 'case_id' must be an integer or a string, got {json_type_name(case_id)}")
    return case_id


@dataclass(frozen=True)
class EditRequest:
    """One requested rewrite: in ``prompt.format(subject)`` the answer should become ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    relation_id: str = ""
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        where = f"edit request {self.case_id!r}" if self.case_id is not None else "edit request"
        if "{}" not in self.prompt:
            raise RecordError(f"{where}: prompt {self.prompt!r} has no '{{}}' placeholder for the subject")
        if not self.subject or not self.subject.strip():
            raise RecordError(f"{where}: empty subject")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise RecordError(f"{where}: empty target_new")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class EditCase:
    """An edit request together with its evaluation prompts.

    ``neighborhood_prompts`` are prompts about *other* subjects whose correct answer is
    ``neighborhood_target`` (``target_true`` in CounterFact; ``loc_ans`` in zsRE).
    """

    case_id: int | str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.request.subject

    @property
    def relation_id(self) -> str:
        return self.request.relation_id

    def to_counterfact(self) -> dict[str, Any]:
        """This case as a CounterFact JSON record."""
        request = self.request
        record: dict[str, Any] = {
            "case_id": self.case_id,
            "requested_rewrite": {
                "prompt": request.prompt,
                "relation_id": request.relation_id,
                "subject": request.subject,
                "target_new": {"str": request.target_new, "id": self.extra.get("target_new_id", "")},
                "target_true": {"str": request.target_true or "", "id": self.extra.get("target_true_id", "")},
            },
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
        }
        return record


def case_from_counterfact(record: Mapping[str, Any], index: int | None = None) -> EditCase:
    """Parse one CounterFact / Multi-CounterFact record, with errors that name the record and the field."""
    if not isinstance(record, Mapping):
        raise RecordError(f"record {index}: expected a JSON object, got {json_type_name(record)}")
    where = f"CounterFact record {record_name(record, index)!r}"
    case_id = check_case_id(record.get("case_id", index), where)
    try:
        rewrite = record["requested_rewrite"]
        prompt = rewrite["prompt"]
        subject = rewrite["subject"]
        target_new = rewrite["target_new"]["str"]
        target_true = rewrite.get("target_true", {}).get("str")
    except (KeyError, TypeError, AttributeError) as err:
        raise RecordError(f"{where}: missing or malformed field {err}") from None
    relation_id = rewrite.get("relation_id", "")
    if not isinstance(relation_id, str):
        raise RecordError(f"{where}: field 'requested_rewrite.relation_id' must be a string, "
                          f"got {json_type_name(relation_id)}")
    if target_true is not None and not isinstance(target_true, str):
        raise RecordError(f"{where}: field 'requested_rewrite.target_true.str' must be a string, "
                          f"got {json_type_name(target_true)}")
    for name in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
        value = record.get(name, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise RecordError(f"{where}: {name} must be a list of strings")
    request = _request(prompt, subject, target_new, relation_id, target_true, case_id, where)
    return EditCase(
        case_id=case_id,
        request=request,
        paraphrase_prompts=tuple(record.get("paraphrase_prompts", [])),
        neighborhood_prompts=tuple(record.get("neighborhood_prompts", [])),
        neighborhood_target=target_true,
        attribute_prompts=tuple(record.get("attribute_prompts", [])),
        generation_prompts=tuple(record.get("generation_prompts", [])),
        extra={
            "target_new_id": rewrite["target_new"].get("id", ""),
            "target_true_id": (rewrite.get("target_true") or {}).get("id", ""),
        },
    )


def record_name(record: Mapping[str, Any], index: int | None) -> Any:
    """What names a record in messages: its ``case_id`` when that is an integer or string, else its index."""
    case_id = record.get("case_id", index)
    return case_id if isinstance(case_id, (int, str)) and not isinstance(case_id, bool) else index


def _request(prompt, subject, target_new, relation_id, target_true, case_id, where) -> EditRequest:
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise RecordError(f"{where}: prompt and subject must be strings")
    if "{}" not in prompt:
        if subject and subject in prompt:
            prompt = prompt.replace(subject, "{}", 1)
        else:
            raise RecordError(f"{where}: subject {subject!r} is not in its prompt {prompt!r}")
    try:
        return EditRequest(prompt, subject, target_new, relation_id or "", target_true, case_id)
    except RecordError as err:
        raise RecordError(f"{where}: {err}") from None
