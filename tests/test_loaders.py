"""CounterFact / zsRE loaders, the CounterFact writer and plain-text streaming (fedke.data.loaders)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from fedke.data.loaders import (
    iter_text_files,
    load_counterfact,
    load_zsre,
    save_counterfact,
    zsre_neighborhood_prompt,
)
from fedke.data.records import EditCase, EditRequest, RecordError

COUNTERFACT = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux is a native speaker of",
                               "Danielle Darrieux, speaker of"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "The native language of Montesquieu is"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{} is headquartered in",
            "relation_id": "P159",
            "target_new": {"str": "Paris", "id": "Q90"},
            "target_true": {"str": "Tokyo", "id": "Q1490"},
            "subject": "Sony",
        },
        "paraphrase_prompts": ["The headquarters of Sony are in"],
        "neighborhood_prompts": ["Toyota is headquartered in"],
        "attribute_prompts": [],
        "generation_prompts": [],
    },
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} plays the position of",
            "relation_id": "P413",
            "target_new": {"str": "goaltender", "id": "Q1317534"},
            "target_true": {"str": "midfielder", "id": "Q193592"},
            "subject": "Xavi",
        },
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
        "attribute_prompts": [],
        "generation_prompts": [],
    },
]

ZSRE = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    },
    {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "pred": "Lecanorales",
        "rephrase": "What family are Ramalinaceae?",
        "alt": " Lamiinae",
        "answers": ["Lecanorales", "Lecanoromycetes"],
        "loc": "nq question: types of skiing in the winter olympics 2018",
        "loc_ans": "Downhill",
        "cond": "Lecanorales >> Lamiinae || Which family does Ramalinaceae belong to?",
    },
]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- CounterFact


def test_load_counterfact_fields(tmp_path):
    cases = load_counterfact(write(tmp_path, "cf.json", COUNTERFACT))
    assert [c.case_id for c in cases] == [0, 1, 7]
    first = cases[0]
    assert first.request.prompt == "The mother tongue of {} is"
    assert first.request.text == "The mother tongue of Danielle Darrieux is"
    assert first.subject == "Danielle Darrieux" and first.relation_id == "P103"
    assert first.request.target_new == "English" and first.request.target_true == "French"
    assert first.neighborhood_target == "French"
    assert first.paraphrase_prompts == tuple(COUNTERFACT[0]["paraphrase_prompts"])
    assert first.neighborhood_prompts == tuple(COUNTERFACT[0]["neighborhood_prompts"])
    assert first.attribute_prompts == ("J.R.R. Tolkien is a native speaker of",)
    assert first.extra["target_new_id"] == "Q1860" and first.extra["target_true_id"] == "Q150"
    assert cases[2].paraphrase_prompts == ()


def test_load_counterfact_limit(tmp_path):
    path = write(tmp_path, "cf.json", COUNTERFACT)
    assert [c.case_id for c in load_counterfact(path, limit=2)] == [0, 1]
    assert load_counterfact(path, limit=0) == []
    with pytest.raises(ValueError):
        load_counterfact(path, limit=-1)


def test_counterfact_round_trip(tmp_path):
    cases = load_counterfact(write(tmp_path, "cf.json", COUNTERFACT))
    out = tmp_path / "sub" / "saved.json"
    save_counterfact(cases, out)
    assert load_counterfact(out) == cases
    saved = json.loads(out.read_text())
    assert saved[0]["requested_rewrite"] == COUNTERFACT[0]["requested_rewrite"]
    assert "neighborhood_target" not in saved[0] and "extra" not in saved[0]
    assert [p.name for p in out.parent.iterdir()] == ["saved.json"]       # no temp file left


def test_save_refuses_case_without_target_true(tmp_path):
    case = EditCase(3, EditRequest("{} lives in", "Ada", "Rome", case_id=3))
    with pytest.raises(RecordError, match="case 3.*target_true"):
        save_counterfact([case], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def _broken(mutate):
    data = copy.deepcopy(COUNTERFACT)
    mutate(data)
    return data


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d[1]["requested_rewrite"].pop("subject"), r"record #1: .*1.*subject"),
    (lambda d: d[1].pop("requested_rewrite"), r"record #1: .*requested_rewrite"),
    (lambda d: d[2]["requested_rewrite"].update(prompt="Someone plays the position of"),
     r"record #2: .*7.*'Xavi' is not in its prompt"),
    (lambda d: d[1]["requested_rewrite"]["target_new"].update(str=""), r"record #1: .*1.*empty target_new"),
    (lambda d: d[0]["requested_rewrite"]["target_true"].update(str="  "), r"record #0: .*0.*empty target_true"),
    (lambda d: d[0]["requested_rewrite"].update(target_true="French"), r"record #0: .*target_true"),
    (lambda d: d[2].update(paraphrase_prompts="not a list"), r"record #2: .*paraphrase_prompts"),
    (lambda d: d.__setitem__(1, ["not", "an", "object"]), r"record #1: .*JSON object"),
    (lambda d: d[2].update(case_id=0), r"record #2: duplicate case_id 0"),
])
def test_counterfact_malformed_records(tmp_path, mutate, pattern):
    path = write(tmp_path, "bad.json", _broken(mutate))
    with pytest.raises(RecordError, match=pattern) as err:
        load_counterfact(path)
    assert str(path) in str(err.value)


def test_counterfact_skip_invalid(tmp_path):
    data = _broken(lambda d: d[1]["requested_rewrite"].pop("subject"))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        cases = load_counterfact(write(tmp_path, "bad.json", data), skip_invalid=True)
    assert [c.case_id for c in cases] == [0, 7]


@pytest.mark.parametrize("loader", [load_counterfact, load_zsre])
def test_invalid_json_and_top_level(tmp_path, loader):
    broken = write(tmp_path, "broken.json", '[{"case_id": 0,')
    with pytest.raises(RecordError, match=r"broken\.json: invalid JSON at line 1"):
        loader(broken)
    not_list = write(tmp_path, "dict.json", {"case_id": 0})
    with pytest.raises(RecordError, match=r"dict\.json: expected a JSON list.*dict"):
        loader(not_list)
    with pytest.raises(FileNotFoundError):
        loader(tmp_path / "missing.json")


# -------------------------------------------------------------------------------------- zsRE


def test_load_zsre_fields(tmp_path):
    cases = load_zsre(write(tmp_path, "zsre_mend_eval.json", ZSRE))
    assert [c.case_id for c in cases] == [0, 1]
    first = cases[0]
    assert first.request.prompt == "What university did {} attend?"
    assert first.request.text == ZSRE[0]["src"]
    assert first.subject == "Watts Humphrey"
    assert first.request.target_new == "University of Michigan"
    assert first.request.target_true == "Illinois Institute of Technology"
    assert first.paraphrase_prompts == ("What university did Watts Humphrey take part in?",)
    assert first.neighborhood_prompts == ("nq question: who played desmond doss father in hacksaw ridge?",)
    assert first.neighborhood_target == "Hugo Weaving"
    assert first.extra["pred"] == "Trinity College"
    assert first.extra["cond"].startswith("Trinity College >>")
    assert first.extra["loc"] == ZSRE[0]["loc"]
    assert cases[1].request.target_new == "Lamiinae"                 # leading space stripped
    assert cases[1].extra["answers"] == ["Lecanorales", "Lecanoromycetes"]


def test_load_zsre_memit_targets(tmp_path):
    cases = load_zsre(write(tmp_path, "z.json", ZSRE), target_new_from="answers")
    assert cases[0].request.target_new == "Illinois Institute of Technology"
    assert cases[0].request.target_true == "Trinity College"          # pred
    assert cases[1].request.target_true == "Lamiinae"                 # pred == answer: fall back to alt


def test_zsre_braces_and_repeated_subject(tmp_path):
    record = dict(ZSRE[0], subject="X", src="Is {X} in X?")
    (case,) = load_zsre(write(tmp_path, "z.json", [record]))
    assert case.request.prompt == "Is {{{}}} in X?"
    assert case.request.text == "Is {X} in X?"


def test_zsre_neighborhood_prompt_keeps_existing_question_mark():
    assert zsre_neighborhood_prompt("nq question: who is it?") == "nq question: who is it?"
    assert zsre_neighborhood_prompt("nq question: who is it ") == "nq question: who is it?"


def test_zsre_round_trip_through_counterfact(tmp_path):
    cases = load_zsre(write(tmp_path, "z.json", ZSRE))
    out = tmp_path / "zsre_as_cf.json"
    save_counterfact(cases, out)
    saved = json.loads(out.read_text())
    assert saved[0]["neighborhood_target"] == "Hugo Weaving"
    assert load_counterfact(out) == cases


@pytest.mark.parametrize("mutate, pattern", [
    (lambda r: r.pop("alt"), r"record #1: zsRE record 1: missing field.*'alt'"),
    (lambda r: r.update(alt="  "), r"record #1: zsRE record 1: empty alt"),
    (lambda r: r.update(answers=[]), r"record #1: zsRE record 1: .*'answers'"),
    (lambda r: r.update(answers=[""]), r"record #1: zsRE record 1: empty answers\[0\]"),
    (lambda r: r.update(loc_ans=""), r"record #1: zsRE record 1: empty loc_ans"),
    (lambda r: r.update(subject="Lichen"), r"record #1: zsRE record 1: .*'Lichen' is not in its 'src'"),
    (lambda r: r.update(rephrase=None), r"record #1: zsRE record 1: .*'rephrase'"),
])
def test_zsre_malformed_records(tmp_path, mutate, pattern):
    data = copy.deepcopy(ZSRE)
    mutate(data[1])
    path = write(tmp_path, "z.json", data)
    with pytest.raises(RecordError, match=pattern) as err:
        load_zsre(path)
    assert str(path) in str(err.value)


def test_zsre_not_an_object(tmp_path):
    with pytest.raises(RecordError, match=r"record #0: zsRE record 0: expected a JSON object"):
        load_zsre(write(tmp_path, "z.json", ["text"]))


# -------------------------------------------------------------------------------- plain text


def test_iter_text_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First line\nof paragraph one.\n\n\nParagraph two.\n  \nThree\n", encoding="utf-8")
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "b.txt").write_text("Bee.\n", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    assert list(iter_text_files(a)) == ["First line of paragraph one.", "Paragraph two.", "Three"]
    assert list(iter_text_files([a, folder], unit="line")) == [
        "First line", "of paragraph one.", "Paragraph two.", "Three", "Bee."]


def test_iter_text_files_missing_file_fails_before_reading(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("hello\n", encoding="utf-8")
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        iter_text_files([a, missing])
    with pytest.raises(ValueError):
        iter_text_files([a], unit="word")


def test_iter_text_files_tolerates_bad_bytes(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    assert list(iter_text_files(os.fspath(path))) == ["caf\ufffd"]


# ------------------------------------------------------------------- hostile files (issue 21, item 8)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_FILES = {
    # the whole file cannot be read: the file is named, whatever the loader or skip_invalid
    "deeply nested": lambda: "[" + _deep(100_000) + "]",
    "not UTF-8": lambda: b'[{"case_id": 0, "subject": "\xff"}]',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
@pytest.mark.parametrize("loader", [load_counterfact, load_zsre])
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_an_unreadable_file_is_a_record_error_naming_it(tmp_path, loader, name, skip_invalid):
    data = HOSTILE_FILES[name]()
    path = tmp_path / "hostile.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(RecordError, match=r"hostile\.json: ") as err:
        loader(path, skip_invalid=skip_invalid)
    assert str(path) in str(err.value)


def test_a_directory_or_missing_file_is_named(tmp_path):
    with pytest.raises(RecordError, match=r"missing\.json") as err:
        load_counterfact(tmp_path / "missing.json")
    assert isinstance(err.value, FileNotFoundError)  # still one, as before
    with pytest.raises(RecordError, match=str(tmp_path)):
        load_counterfact(tmp_path)


HUGE = "1" * 5000  # beyond Python's int-string conversion limit (4300 digits)


@pytest.mark.parametrize("where, text, pattern", [
    ("case_id", f'"case_id": {HUGE}', r"record #1: .*case_id.*5000 digits"),
    ("target id", None, r"record #1: .*requested_rewrite\.target_new\.id.*5000 digits"),
    ("list case_id", '"case_id": [1, 2]', r"record #1: .*case_id.*integer or a string.*list"),
    ("dict case_id", '"case_id": {"a": 1}', r"record #1: .*case_id.*integer or a string.*dict"),
    ("float case_id", '"case_id": 1.5', r"record #1: .*case_id.*integer or a string.*float"),
    ("bool case_id", '"case_id": true', r"record #1: .*case_id.*integer or a string.*bool"),
    ("list relation", None, r"record #1: .*relation_id.*string"),
])
def test_hostile_counterfact_records_are_named_and_skippable(tmp_path, where, text, pattern):
    records = [json.dumps(record) for record in COUNTERFACT]
    if where == "target id":
        records[1] = records[1].replace('"id": "Q90"', f'"id": {HUGE}')
    elif where == "list relation":
        records[1] = records[1].replace('"relation_id": "P159"', '"relation_id": ["P159"]')
    else:
        records[1] = records[1].replace('"case_id": 1', text)
    assert records[1] != json.dumps(COUNTERFACT[1])
    path = write(tmp_path, "hostile.json", "[" + ", ".join(records) + "]")
    with pytest.raises(RecordError, match=pattern) as err:
        load_counterfact(path)
    assert str(path) in str(err.value)
    with pytest.warns(UserWarning, match=r"hostile\.json: skipped 1 malformed record"):
        cases = load_counterfact(path, skip_invalid=True)
    assert [c.case_id for c in cases] == [0, 7]


def test_hostile_zsre_records_are_named_and_skippable(tmp_path):
    records = [json.dumps(record) for record in ZSRE]
    records[0] = records[0].replace('"pred": "Trinity College"', f'"pred": {HUGE}')
    path = write(tmp_path, "z.json", "[" + ", ".join(records) + "]")
    with pytest.raises(RecordError, match=r"z\.json: record #0: .*'pred'.*5000 digits"):
        load_zsre(path)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert len(load_zsre(path, skip_invalid=True)) == 1


def test_dataset_fact_set_names_a_hostile_file(tmp_path):
    from fedke.testbed import dataset_fact_set

    path = tmp_path / "latin1.json"
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(RecordError, match=r"latin1\.json"):
        dataset_fact_set(path)
    path.write_text(f'[{{"case_id": {HUGE}, "requested_rewrite": {{}}}}]')
    with pytest.raises(RecordError, match=r"latin1\.json: record #0: .*case_id"):
        dataset_fact_set(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        dataset_fact_set(tmp_path / "nothing.json")
