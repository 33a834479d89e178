"""The real-fact set (probe, records, cache), fact sets, covariance text and editing settings files.

The probe is model-agnostic: here it runs on the tiny world model over a fact table written from the
world's own facts, and is checked against brute-force scoring of every candidate object.
"""

from __future__ import annotations

import json

import pytest

from fedke.data.corpus import covariance_passages, file_passages, source_key, stdlib_passages, take_tokens
from fedke.data.factset import FactSet
from fedke.data.loaders import load_counterfact, save_counterfact
from fedke.data.realfacts import (FactRelation, FactTable, build_records, load_fact_table, probe_relation,
                                  real_fact_set)
from fedke.data.records import RecordError
from fedke.editing.hparams import EditingSettings
from fedke.eval import score_prompt_targets


def world_table(world, subjects_per_relation: int = 40) -> FactTable:
    """A fact table of the world's own facts (its templates, the first as the main one)."""
    relations = tuple(
        FactRelation(r.relation_id, r.name, r.templates,
                     tuple((s, world.facts[s, r.relation_id]) for s in world.subjects[:subjects_per_relation]))
        for r in world.relations)
    return FactTable(relations, digest="world-test")


#: The probe and the full scoring compute the same float32 log-probs in batches of other shapes, which
#: round differently: a few ulps of a value near 5 (an ulp there is 4.8e-7; 1.1e-6 was seen).
SCORE_TOL = 4e-6


def test_probe_ranks_like_scoring_every_candidate(tiny_bed):
    """The pruned ranking (first-token bound) equals scoring every object of the relation in full."""
    plain = world_table(tiny_bed.world, 24).relations[0]
    # two-token objects too, so that the bound (first-token log-prob / length) does the pruning
    facts = tuple((s, o if i % 2 else f"{o} {plain.facts[(i + 3) % len(plain.facts)][1]}")
                  for i, (s, o) in enumerate(plain.facts))
    relation = FactRelation(plain.relation_id, plain.name, plain.templates, facts)
    probed = probe_relation(tiny_bed.model, tiny_bed.tokenizer, relation)
    objects = relation.objects
    prompts = [relation.templates[0].format(s) for s, _ in relation.facts for _ in objects]
    targets = [o for _ in relation.facts for o in objects]
    nll = score_prompt_targets(tiny_bed.model, tiny_bed.tokenizer, prompts, targets).mean_nll.view(
        len(relation.facts), len(objects))
    for row, fact in enumerate(probed):
        scores = {o: -float(nll[row, j]) for j, o in enumerate(objects)}
        assert fact.score == pytest.approx(scores[fact.true_object], abs=SCORE_TOL)
        best_rival = max((o for o in objects if o != fact.true_object), key=scores.get)
        assert fact.held == (scores[fact.true_object] > scores[best_rival])
        # the rival reported is a real score of another object: the best one for a held fact, one that
        # beats the truth otherwise
        assert fact.rival != fact.true_object and fact.rival_score <= scores[best_rival] + SCORE_TOL
        if fact.rival:
            assert fact.rival_score == pytest.approx(scores[fact.rival], abs=SCORE_TOL)
        if not fact.held:
            assert fact.rival_score > scores[fact.true_object]
    assert 0 < sum(f.held for f in probed) < len(probed)


def test_records_are_counterfact_cases_with_consistent_prompts(tiny_bed):
    table = world_table(tiny_bed.world, 30)
    probed = [f for r in table.relations for f in probe_relation(tiny_bed.model, tiny_bed.tokenizer, r)]
    held = [f for f in probed if f.held]
    records = build_records(table, held, seed=3)
    assert records == build_records(table, held, seed=3) and len(records) == len(held)
    truth = {(f.subject, f.relation_id): f.true_object for f in held}
    main = {r.relation_id: r.templates[0] for r in table.relations}
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, relation_id = rewrite["subject"], rewrite["relation_id"]
        assert rewrite["target_true"]["str"] == truth[subject, relation_id] != rewrite["target_new"]["str"]
        assert rewrite["prompt"] == main[relation_id]
        # neighbours: other held subjects with the same true object; attributes: holders of the new one
        for prompt in record["neighborhood_prompts"]:
            other = next(s for (s, r), o in truth.items() if r == relation_id and prompt == main[r].format(s))
            assert other != subject and truth[other, relation_id] == rewrite["target_true"]["str"]
        for prompt in record["attribute_prompts"]:
            other = next(s for (s, r), o in truth.items() if r == relation_id and prompt == main[r].format(s))
            assert truth[other, relation_id] == rewrite["target_new"]["str"]
        assert all(subject in p for p in record["paraphrase_prompts"])


def test_real_fact_set_is_cached_and_loads_through_the_counterfact_loader(tiny_bed, tmp_path, monkeypatch):
    table = world_table(tiny_bed.world, 20)
    facts = real_fact_set(tiny_bed.model, tiny_bed.tokenizer, table=table, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("realfacts/*/*/counterfact.json"))
    assert len(files) == 1 and len(load_counterfact(files[0])) == len(facts) > 0
    report = json.loads((files[0].parent / "probe.json").read_text())
    assert report["n_held"] == len(facts) and set(report["relations"]) == {r.relation_id for r in table.relations}
    assert facts.relation_by_id[table.relations[0].relation_id].templates == table.relations[0].templates

    import fedke.data.realfacts as realfacts

    monkeypatch.setattr(realfacts, "probe_table", lambda *a, **k: pytest.fail("probed again despite the cache"))
    again = real_fact_set(tiny_bed.model, tiny_bed.tokenizer, table=table, cache_dir=tmp_path, progress=False)
    assert [c.case_id for c in again.cases] == [c.case_id for c in facts.cases]


def test_fact_table_errors_name_the_relation(tmp_path):
    table = load_fact_table()  # the shipped one parses
    assert len(table.relations) >= 8 and table.n_facts >= 500
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"relations": [{"relation_id": "P1", "templates": ["no slot", "x {}"],
                                               "facts": {"a": "b"}}]}))
    with pytest.raises(RecordError, match=r"relation 0 \(P1\).*exactly one"):
        load_fact_table(bad)
    bad.write_text("{")
    with pytest.raises(RecordError, match="invalid JSON"):
        load_fact_table(bad)


def test_fact_set_deals_seeded_cases_once_per_fact(tiny_bed, tmp_path):
    cases = tiny_bed.world.edit_cases(30, seed=1)
    facts = FactSet.from_cases("mine", cases)
    assert len(facts) == 30 and set(facts.subjects) == {c.subject for c in cases}
    first = facts.edit_cases(10, seed=4)
    assert [c.request for c in first] == [c.request for c in facts.edit_cases(10, seed=4)]
    assert [c.case_id for c in first] == list(range(10))
    rest = facts.edit_cases(20, seed=4, exclude=[(c.subject, c.relation_id) for c in first])
    assert not {(c.subject, c.relation_id) for c in first} & {(c.subject, c.relation_id) for c in rest}
    with pytest.raises(ValueError, match="only 30 free"):
        facts.edit_cases(31)
    with pytest.raises(ValueError, match="both edit"):
        FactSet("dup", (cases[0], cases[0]), ())
    relation = facts.relation_by_id[cases[0].relation_id]
    assert cases[0].request.target_true in relation.objects and cases[0].request.prompt in relation.templates
    # a user's CounterFact file becomes the same fact set
    from fedke.testbed import dataset_fact_set

    path = tmp_path / "mine.json"
    save_counterfact(cases, path)
    loaded = dataset_fact_set(path)
    assert [c.request for c in loaded.cases] == [c.request for c in cases]
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="not a JSON list"):
        dataset_fact_set(tmp_path / "x.json")


def test_covariance_text_sources(tiny_bed, tmp_path):
    passages = stdlib_passages()
    assert len(passages) > 500 and all(len(p) >= 80 for p in passages)
    tokenizer = tiny_bed.tokenizer
    some = take_tokens(passages, tokenizer, 2000, seed=1)
    assert some == take_tokens(passages, tokenizer, 2000, seed=1) != take_tokens(passages, tokenizer, 2000, seed=2)
    assert source_key("stdlib", 2000) == "stdlib-2000-s0" and source_key(str(tmp_path), 10) is None
    text = tmp_path / "t.txt"
    text.write_text("one line\n\nanother line\n")
    assert covariance_passages(str(text), tiny_bed.model, tokenizer, 100) in (["one line", "another line"],
                                                                              ["another line", "one line"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        file_passages(tmp_path / "missing.txt")
    sampled = covariance_passages("model", tiny_bed.model, tokenizer, 64, seed=0)
    assert sampled and sampled == covariance_passages("model", tiny_bed.model, tokenizer, 64, seed=0)


def test_editing_settings_files_round_trip(tmp_path):
    smol = EditingSettings.load("smollm2")
    assert smol.memit.fact_token == "subject_last" and smol.memit.layers == (4, 5, 6, 7, 8)
    assert EditingSettings.load("world").memit.fact_token == "last"
    path = tmp_path / "mine.json"
    smol.with_memit(lam=123.0).save(path)
    again = EditingSettings.load(path)
    assert again.memit == smol.memit.__class__(**{**smol.memit.__dict__, "lam": 123.0})
    assert (again.covariance_text, again.covariance_tokens) == (smol.covariance_text, smol.covariance_tokens)
    path.write_text(json.dumps({"memit": {"lamda": 3.0}}))
    with pytest.raises(ValueError, match=r"unknown MEMIT setting\(s\) \['lamda'\]"):
        EditingSettings.load(path)
    with pytest.raises(ValueError, match="no editing settings"):
        EditingSettings.load("gpt-17")


def test_probe_report_counts_each_relation(tiny_bed):
    table = world_table(tiny_bed.world, 10)
    from fedke.data.realfacts import probe_summary, probe_table

    probed = probe_table(tiny_bed.model, tiny_bed.tokenizer, table, progress=False)
    summary = probe_summary(table, probed)
    assert sum(v["facts"] for v in summary.values()) == table.n_facts
    assert all(0 <= v["held"] <= v["facts"] for v in summary.values())


def test_hparams_sweep_writes_its_keys(tiny_bed, load_bench, tmp_path):
    out = tmp_path / "sweep.json"
    result = load_bench("hparams_sweep").main(["--quick", "--fact-tokens", "last", "--targets", "lean",
                                               "--out", str(out)])
    assert set(json.loads(out.read_text())) == {"runs", "best", "peak_rss_mb", "config"}
    assert len(result["runs"]) == 2 and result["best"] in result["runs"]
    assert {"ES", "PS", "NS", "Score", "lam", "fact_token", "targets", "target_seconds"} <= set(result["runs"][0])


def test_a_hostile_fact_table_or_fact_file_is_a_record_error_naming_it(tmp_path):
    """Deep nesting, a 5,000-digit integer or a list case_id (issue 21, item 8)."""
    from fedke.data.realfacts import fact_set_from_file

    bad = tmp_path / "table.json"
    bad.write_text('{"relations": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RecordError, match=r"table\.json: .*nested"):
        load_fact_table(bad)
    bad.write_text(json.dumps({"relations": [{"relation_id": "P1", "name": "x", "templates": ["{} a", "{} b"],
                                              "facts": {"s": "o"}}]}).replace('"x"', "9" * 5000))
    with pytest.raises(RecordError, match=r"table\.json: field 'relations\[0\]\.name'.*5000 digits"):
        load_fact_table(bad)
    cases = tmp_path / "facts.json"
    cases.write_text(json.dumps([{"case_id": [0], "requested_rewrite": {
        "prompt": "{} is in", "subject": "S", "relation_id": "P1",
        "target_new": {"str": "A", "id": ""}, "target_true": {"str": "B", "id": ""}}}]))
    with pytest.raises(RecordError, match=r"facts\.json: record #0: .*case_id"):
        fact_set_from_file(cases)
