"""Knowledge conflict: HMAC claims, collisions, resolution policies, the coordinator, injection, one round end to end."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from fedke.conflict import (
    CLAIMS_KEY,
    DECISIONS_KEY,
    SECRET_ENV,
    Claim,
    ClientPriority,
    ConflictAgent,
    ConflictCoordinator,
    FCFS,
    FIFO,
    augment_request,
    conflict_token,
    decode_claims,
    detection_scores,
    encode_claims,
    find_collisions,
    load_secret,
    make_policy,
    normalise_text,
    object_token,
    parse_decisions,
    world_augmentation,
)
from fedke.data.records import EditCase, EditRequest
from fedke.simulations.results import read_results

SECRET = b"federation-secret-0123456789"
OTHER = b"another-secret-abcdefghijklmn"


def case(subject="Ada Vorn", relation="P551", obj="Kelmar", true="Dusso", case_id=0, timestamp=0.0, prompt="{} lives in"):
    request = EditRequest(prompt, subject, obj, relation, true, case_id)
    return EditCase(case_id, request, extra={"timestamp": timestamp})


# ----------------------------------------------------------------------------- tokens


def test_tokens_depend_on_the_secret_and_reveal_no_text():
    token = conflict_token(SECRET, "Ada Vorn", "P551")
    assert len(token) == 32 and int(token, 16) >= 0
    assert conflict_token(SECRET, "Ada Vorn", "P551") == token  # deterministic: collisions can be found
    assert conflict_token(OTHER, "Ada Vorn", "P551") != token  # without the secret, no way to recompute it
    # nothing of the text, nor an unkeyed hash of it, is in the token
    for text in ("ada vorn", "p551", "ada", "vorn", "ada vorn".encode().hex(), "p551".encode().hex()):
        assert text not in token
    for message in ("ada vorn|p551", "Ada Vorn|P551", "ada vornp551"):
        assert hashlib.sha256(message.encode()).hexdigest()[:32] != token
    # every fact gets an unrelated token: 200 facts, 200 distinct tokens, bits balanced
    tokens = {conflict_token(SECRET, f"Subject {i}", "P551") for i in range(200)}
    assert len(tokens) == 200
    ones = sum(bin(int(t, 16)).count("1") for t in tokens) / (200 * 128)
    assert 0.45 < ones < 0.55


def test_normalisation_and_field_separation():
    assert normalise_text("  Ada   VORN. ") == normalise_text("ada vorn") == "ada vorn"
    assert normalise_text("ＡＤＡ vorn") == "ada vorn"  # NFKC: full-width letters
    assert conflict_token(SECRET, "  Ada   VORN. ", " p551 ") == conflict_token(SECRET, "ada vorn", "P551")
    assert conflict_token(SECRET, "Ada Vorn", "P551") != conflict_token(SECRET, "Ada Vorn", "P106")
    assert conflict_token(SECRET, "ab", "c") != conflict_token(SECRET, "a", "bc")  # length-prefixed fields
    assert object_token(SECRET, "Ada Vorn", "P551", "Kelmar") != object_token(SECRET, "Ada Vorn", "P551", "Dusso")
    assert object_token(SECRET, "Ada Vorn", "P551", "kelmar ") == object_token(SECRET, "ada vorn", "P551", "Kelmar")
    assert object_token(SECRET, "Ada Vorn", "P551", "Kelmar") != conflict_token(SECRET, "Ada Vorn", "P551")


def test_secret_loading():
    assert load_secret(None, env={}) is None
    assert load_secret(None, env={SECRET_ENV: "x" * 16}) == b"x" * 16
    assert load_secret("y" * 20, env={SECRET_ENV: "x" * 16}) == b"y" * 20  # explicit value first
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_secret("short", env={})
    with pytest.raises(ValueError, match="at least 16 bytes"):
        conflict_token(b"short", "a", "b")


def test_same_fact_on_two_clients_collides_and_other_facts_do_not():
    alice = ConflictAgent(SECRET, name="alice")
    bob = ConflictAgent(SECRET, name="bob")
    eve = ConflictAgent(OTHER, name="eve")  # a different federation
    coordinator = ConflictCoordinator("fcfs")
    sent = {
        "alice": alice.claims([case(obj="Kelmar", case_id=1), case(subject="Bo Lund", case_id=2)]),
        "bob": bob.claims([case(subject="ada  vorn", obj="Tazar", case_id=3), case(subject="Cy Tor", case_id=4)]),
        "eve": eve.claims([case(obj="Brum", case_id=5)]),
    }
    for client, claims in sent.items():
        coordinator.observe(1, client, {CLAIMS_KEY: claims})
    metrics = coordinator.end_round(1)
    assert metrics["conflict_collisions"] == 1 and metrics["conflict_requests"] == 2
    assert metrics["conflict_cross_client"] == 1 and metrics["conflict_claims"] == 5
    (collision,) = coordinator.history[0][1]
    assert {c.client for c in collision.claims} == {"alice", "bob"} and collision.kind == "conflict"
    # what the server received is tokens and timestamps, no text
    for claims in sent.values():
        assert "vorn" not in claims.lower() and "kelmar" not in claims.lower() and "p551" not in claims.lower()


# ----------------------------------------------------------------------------- wire format


def test_claims_round_trip_and_malformed_claims():
    token, otoken = conflict_token(SECRET, "a", "b"), object_token(SECRET, "a", "b", "c")
    text = encode_claims([(token, otoken, 1.5)], name="3", failed=2)
    assert decode_claims(text) == {"name": "3", "claims": [(token, otoken, 1.5)], "failed": 2}
    bad = [
        "not json", json.dumps({"v": 2, "claims": []}),
        json.dumps({"v": 1, "claims": [["zz" * 16, otoken, 0.0]]}),
        json.dumps({"v": 1, "claims": [[token, otoken]]}),
        json.dumps({"v": 1, "claims": [[token, otoken, "soon"]]}),
        json.dumps({"v": 1, "claims": [], "failed": -1}),
    ]
    for text in bad:
        with pytest.raises(ValueError):
            decode_claims(text)
    with pytest.raises(ValueError):
        decode_claims(encode_claims([(token, otoken, float("nan"))]))
    with pytest.raises(ValueError, match="client 7"):
        ConflictCoordinator().observe(1, "7", {CLAIMS_KEY: "{}"})


# ----------------------------------------------------------------------------- collisions and policies


def claim(client, otoken_seed, timestamp, arrival, name=None, token="a" * 32):
    return Claim(client, name or client, 1, token, f"{otoken_seed:032x}", timestamp, arrival)


def test_find_collisions_within_and_across_clients():
    claims = [claim("1", 1, 0.0, 1), claim("1", 2, 0.0, 1), claim("2", 1, 0.0, 2),
              claim("3", 5, 0.0, 3, token="b" * 32)]
    (collision,) = find_collisions(claims)
    assert len(collision.claims) == 3 and collision.kind == "conflict" and collision.cross_client
    overlap = find_collisions([claim("1", 1, 0.0, 1), claim("2", 1, 0.0, 2)])[0]
    assert overlap.kind == "overlap"
    assert find_collisions([claim("1", 1, 0.0, 1)]) == []


def test_fcfs_picks_the_earliest_request_whatever_its_arrival():
    early_late = claim("late-arrival", 1, timestamp=1.0, arrival=9)
    late_early = claim("early-arrival", 2, timestamp=5.0, arrival=1)
    assert FCFS().choose([late_early, early_late]) == early_late
    # equal timestamps: arrival breaks the tie
    assert FCFS().choose([claim("x", 1, 2.0, 4), claim("y", 2, 2.0, 3)]).client == "y"


def test_fifo_picks_the_first_arrival_whatever_its_timestamp():
    early_late = claim("late-arrival", 1, timestamp=1.0, arrival=9)
    late_early = claim("early-arrival", 2, timestamp=5.0, arrival=1)
    assert FIFO().choose([early_late, late_early]) == late_early
    with pytest.raises(ValueError):
        FIFO().choose([])


def test_client_priority_list():
    policy = make_policy("priority", "2, 0")
    assert isinstance(policy, ClientPriority) and policy.order == ("2", "0")
    claims = [claim("node-a", 1, 0.0, 1, name="0"), claim("node-b", 2, 9.0, 2, name="2"), claim("node-c", 3, 0.0, 0, name="7")]
    assert policy.choose(claims).name == "2"
    assert policy.choose([claims[0], claims[2]]).name == "0"  # unlisted clients rank last
    assert policy.choose([claims[2], claim("node-d", 4, 0.0, 5, name="8")]).name == "7"  # both unlisted: FIFO
    with pytest.raises(ValueError, match="twice"):
        ClientPriority(("1", "1"))
    assert make_policy("FCFS") == FCFS() and make_policy("fifo") == FIFO()
    with pytest.raises(ValueError, match="unknown conflict policy"):
        make_policy("random")


@pytest.mark.parametrize("policy,winner", [("fcfs", "bob"), ("fifo", "alice"), ("priority", "carol")])
def test_coordinator_sends_each_client_only_its_own_decisions(policy, winner):
    agents = {name: ConflictAgent(SECRET, name=name) for name in ("alice", "bob", "carol")}
    cases = {"alice": case(obj="Kelmar", timestamp=3.0), "bob": case(obj="Tazar", timestamp=1.0),
             "carol": case(obj="Brum", timestamp=2.0)}
    coordinator = ConflictCoordinator(policy, priority="carol,alice,bob")
    for name in ("alice", "bob", "carol"):  # arrival order
        coordinator.observe(1, name, {CLAIMS_KEY: agents[name].claims([cases[name]])})
    coordinator.end_round(1)
    for name, agent in agents.items():
        config = coordinator.fit_config(name)
        decisions = parse_decisions(config)
        assert len(decisions) == 1 and decisions[0][:2] == agent.tokens(cases[name])  # only its own claim
        reedit, withdrawn = agent.apply_decisions(config, [cases[name]])
        assert (reedit, withdrawn) == (([cases[name]], []) if name == winner else ([], [cases[name]]))
        assert coordinator.fit_config(name) == {}  # sent once
    # the same fact claimed again later is settled: no new decisions
    coordinator.observe(2, "alice", {CLAIMS_KEY: agents["alice"].claims([cases["alice"]])})
    coordinator.observe(2, "bob", {CLAIMS_KEY: agents["bob"].claims([cases["bob"]])})
    assert coordinator.end_round(2)["conflict_collisions"] == 0


def test_overlap_winner_duplicates_are_kept_not_withdrawn():
    agents = [ConflictAgent(SECRET, name=str(i)) for i in range(3)]
    same_a, same_b, other = case(obj="Kelmar", timestamp=1.0), case(obj="Kelmar", timestamp=2.0), case(obj="Tazar", timestamp=3.0)
    coordinator = ConflictCoordinator("fcfs")
    for i, c in enumerate((same_a, same_b, other)):
        coordinator.observe(1, str(i), {CLAIMS_KEY: agents[i].claims([c])})
    coordinator.end_round(1)
    actions = [parse_decisions(coordinator.fit_config(str(i)))[0][2] for i in range(3)]
    assert actions == ["win", "keep", "lose"]


def test_local_resolution_among_one_clients_requests():
    agent = ConflictAgent(SECRET, policy=FCFS(), augment=lambda r: [r, replace(r, prompt="Indeed , " + r.prompt)])
    first, second = case(obj="Kelmar", timestamp=2.0, case_id=1), case(obj="Tazar", timestamp=1.0, case_id=2)
    dup, unrelated = case(obj="Tazar", timestamp=5.0, case_id=3), case(subject="Cy Tor", case_id=4)
    kept, winners, losers = agent.resolve_locally([first, second, dup, unrelated])
    assert kept == [second, unrelated] and winners == [second] and losers == [first]
    assert [r.prompt for r in agent.requests_for(second)] == ["{} lives in", "Indeed , {} lives in"]
    with pytest.raises(ValueError, match="mode"):
        ConflictAgent(SECRET, mode="off")
    with pytest.raises(ValueError, match="malformed"):
        parse_decisions({DECISIONS_KEY: json.dumps([["x", "y", "win"]])})


def test_detection_scores():
    assert detection_scores({1, 2, 3}, {2, 3, 4, 5}) == {"precision": 2 / 3, "recall": 0.5, "flagged": 3, "true": 4}
    assert detection_scores(set(), set())["precision"] == 1.0
    assert detection_scores(set(), {1})["recall"] == 0.0


# ----------------------------------------------------------------------------- augmentation


def test_augment_request():
    request = EditRequest("{} lives in", "Ada Vorn", "Kelmar", "P551", "Dusso", 7)
    out = augment_request(request, templates=["{} lives in", "The home town of {} is"],
                          related=["Ada Vorn works as a baker ."], wrappers=["Indeed , {}"])
    assert [r.prompt for r in out] == ["{} lives in", "The home town of {} is", "Indeed , {} lives in",
                                       "Ada Vorn works as a baker . {} lives in"]
    assert all((r.subject, r.target_new, r.relation_id, r.case_id) == ("Ada Vorn", "Kelmar", "P551", 7) for r in out)
    with pytest.raises(ValueError, match="no '{}'"):
        augment_request(request, templates=["no placeholder"])


def test_world_augmentation_speaks_the_world_vocabulary(tiny_bed):
    world = tiny_bed.world
    request = world.edit_cases(1, seed=3)[0].request
    out = world_augmentation(world)(request)
    relation = world.relation_by_id[request.relation_id]
    assert {r.prompt for r in out} >= set(relation.templates)
    assert len(out) == len(relation.templates) + 2 + 2  # templates, 2 wrappers, 2 related facts
    unk = tiny_bed.tokenizer.unk_token_id
    for r in out:
        assert unk not in tiny_bed.tokenizer(r.text)["input_ids"], r.text


# ----------------------------------------------------------------------------- scenario injection


def test_scenario_injects_conflicting_pairs(tiny_bed, cache_dir):
    from fedke.simulations.dealing import deal_cases
    from fedke.simulations.scenario import Scenario

    base = Scenario.from_preset("tiny", cache_dir=str(cache_dir), num_rounds=1)
    with pytest.raises(ValueError, match="conflict-pairs"):
        replace(base, conflict_pairs=base.num_clients * base.edits_per_client + 1)
    with pytest.raises(ValueError, match="conflict-layout"):
        replace(base, conflict_layout="nowhere")
    plain = deal_cases(base, tiny_bed.world)
    for layout in ("cross-client", "same-client"):
        dealt = deal_cases(replace(base, conflict_pairs=4, conflict_layout=layout), tiny_bed.world)
        twins = [(holder, c) for (holder, _), cs in dealt.items() for c in cs if str(c.case_id).endswith("'")]
        assert len(twins) == 4
        owner = {c.case_id: client for (client, _), cs in dealt.items() for c in cs}
        originals = {c.case_id: c for cs in dealt.values() for c in cs}
        for holder, twin in twins:
            source = originals[twin.extra["conflicts_with"]]
            assert source.extra["conflicts_with"] == twin.case_id
            assert (twin.subject, twin.relation_id, twin.request.prompt) == (source.subject, source.relation_id, source.request.prompt)
            assert twin.request.target_new not in (source.request.target_new, source.request.target_true)
            same_client = holder == owner[source.case_id]
            assert same_client == (layout == "same-client")
        # the original cases are dealt exactly as without injection
        assert {k: [c.case_id for c in v] for k, v in plain.items()} == \
               {k: [c.case_id for c in v if not str(c.case_id).endswith("'")] for k, v in dealt.items()}
        assert all("timestamp" in c.extra for cs in dealt.values() for c in cs)


# ----------------------------------------------------------------------------- one conflict round end to end


@pytest.mark.slow
def test_conflict_round_end_to_end(tiny_bed, cache_dir, tmp_path):
    """Round 1: two clients send conflicting requests; the server sees colliding tokens only.
    Round 2: the loser withdraws, the winner re-edits with augmentation; the winner's object wins."""
    from fedke.eval import conflict_summary, prob_delta
    from fedke.editing import applied_update
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    scenario = Scenario.from_preset("tiny", cache_dir=str(cache_dir), output_dir=str(tmp_path), num_rounds=2,
                                    conflict_pairs=3, conflict_detection="hmac", conflict_policy="fcfs",
                                    conflict_secret="test-federation-secret-0123")
    outcome = run_in_process(scenario, write=False, evaluate=False)
    strategy = outcome.strategy
    first, second = strategy.round_metrics
    assert first["conflict_collisions"] == 3 and first["conflict_cross_client"] == 3
    assert second["conflict_collisions"] == 3  # round 2 brings three conflicts of its own (resolved in round 3)
    actions = sorted(action for decided, _, action in strategy.conflict_coordinator.decisions if decided == 1)
    assert actions == ["lose"] * 3 + ["win"] * 3
    # round 2 edits the 12 new requests plus the three winners, augmented
    assert second["n_edits"] > 12 + 3
    # the winner's object after resolution vs after round 1
    from fedke.simulations.runtime import dealt_cases_for

    dealt = dealt_cases_for(scenario)
    cases = {c.case_id: c for (_, r), cs in dealt.items() if r == 1 for c in cs}
    pairs = []
    for source in [c for c in cases.values() if "conflicts_with" in c.extra and not str(c.case_id).endswith("'")]:
        twin = cases[source.extra["conflicts_with"]]
        winner, loser = sorted((source, twin), key=lambda c: c.extra["timestamp"])  # FCFS
        pairs.append((winner, loser))
    prompts = [w.request.text for w, _ in pairs]

    def table4(update):
        with applied_update(tiny_bed.model, update):
            frame = prob_delta(tiny_bed.model, tiny_bed.tokenizer, prompts,
                               [w.request.target_new for w, _ in pairs], [l.request.target_new for _, l in pairs])
        return conflict_summary(frame)

    # the update after round 1 alone (the same dealing: it is prefix-stable)
    one = run_in_process(replace(scenario, num_rounds=1), write=False, evaluate=False).strategy.global_update
    before, after = table4(one), table4(strategy.global_update)
    assert after["Avg-DeltaP"] > before["Avg-DeltaP"] and after["Avg-DeltaP"] > 0
    assert after["Succ"] >= before["Succ"]


def test_after_the_fact_mode_reports_failing_requests_only(tiny_bed):
    """``"failures"``: the client checks its earlier requests on the global model it receives and
    reports how many fail, with the tokens of those only; with their edit merged, fewer fail."""
    from fedke.codec import encode_update
    from fedke.simulations.client import EditClient

    editor = tiny_bed.editor(lam=30.0)
    cases = tiny_bed.world.edit_cases(4, seed=21)
    agent = ConflictAgent(SECRET, mode="failures", name="0")
    client = EditClient(editor, tiny_bed.model, tiny_bed.tokenizer, {1: cases}, conflict_agent=agent)
    arrays, n, metrics = client.fit([], {"server_round": 1})
    assert n == 4 and CLAIMS_KEY not in metrics  # nothing edited before: nothing to report yet
    zeros = encode_update({name: np.zeros(shape) for name, shape in editor.layer_shapes().items()})
    _, n, metrics = client.fit(zeros, {"server_round": 2})  # the edit was never merged: all fail
    body = decode_claims(metrics[CLAIMS_KEY])
    assert n == 0 and body["failed"] == 4
    assert [c[:2] for c in body["claims"]] == [agent.tokens(c) for c in cases]
    merged = encode_update(editor.edit([c.request for c in cases]).deltas())
    body = decode_claims(client.fit(merged, {"server_round": 2})[2][CLAIMS_KEY])
    assert body["failed"] < 4 and len(body["claims"]) == body["failed"]


@pytest.mark.slow
@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_conflict_rounds_under_flwr_run_match_the_in_process_loop(tiny_bed, cache_dir, tmp_path, monkeypatch):
    """The same two conflict rounds through a real ``flwr run``: claims travel in the fit metrics,
    decisions in each client's own fit config (Ray actors rebuild the clients every round)."""
    from pathlib import Path

    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.flwr_cli import load_run_config
    from fedke.simulations.launch import run_app
    from fedke.simulations.processes import processes_with_flwr_home
    from fedke.simulations.scenario import Scenario

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = Path(__file__).resolve().parents[1]
    config = load_run_config(repo / "simulations" / "presets" / "tiny.toml")
    config.update({"conflict-pairs": 3, "conflict-detection": "hmac", "cache-dir": str(cache_dir),
                   "conflict-secret": "flwr-run-federation-secret-01", "output-dir": str(tmp_path / "out")})
    home = (tmp_path / "flwr-home").resolve()
    try:
        result = run_app(repo, num_supernodes=3, run_config=config, flwr_home=home, timeout_s=300, stream=False)
    finally:
        assert not processes_with_flwr_home(home)
    assert result.ok and result.status_text == "finished:completed", result.log_tail()
    table = read_results(tmp_path / "out" / "results.csv")
    merge = table[table.request_set == "merge"]
    keys = ("n_edits", "conflict_claims", "conflict_collisions", "conflict_cross_client")
    flower = {(int(r["round"]), r["metric"]): r["value"] for _, r in merge.iterrows() if r["metric"] in keys}
    scenario = Scenario.from_run_config({k: v for k, v in config.items()})
    local = run_in_process(replace(scenario, output_dir=str(tmp_path / "local")), write=False, evaluate=False)
    for metrics in local.strategy.round_metrics:
        for key in keys:
            assert flower[metrics["server_round"], key] == metrics[key], key
    assert flower[2, "n_edits"] > flower[1, "n_edits"]  # round 2 carries the winners' augmented re-edits


def test_claims_that_would_raise_something_else_raise_value_error():
    """Issue 21: deeply nested claims raised RecursionError out of the coordinator (and the ServerApp)."""
    for text in ("[" * 100_000 + "]" * 100_000, '{"v": 1, "claims": ' + "[" * 50_000 + "]" * 50_000 + "}",
                 "x" * (201 * 100_000), '{"v": 1, "claims": [], "failed": 10000000000000000000000}', b"\xff\xfe"):
        with pytest.raises(ValueError):
            decode_claims(text)
    coordinator = ConflictCoordinator()
    with pytest.raises(ValueError, match=r"client 3: metrics\['fedke.conflict.claims'\]: claims are JSON nested too deeply"):
        coordinator.observe(1, "3", {CLAIMS_KEY: "[" * 100_000})
    with pytest.raises(ValueError, match="expected a dict"):
        coordinator.read_claims(["not", "a", "dict"])
    assert coordinator.read_claims(None) is None and coordinator.read_claims({}) is None
    assert coordinator.end_round(1)["conflict_claims"] == 0


def test_conflict_benchmark_sizes_and_scenario_per_model(load_bench):
    """``--model smollm2`` runs the real model with its own sizes; the scenario carries the pairs,
    HMAC detection and the cache; the world stays the default."""
    module = load_bench("conflict")
    world = module.parse_args([])
    assert (world.model, world.pairs, world.clients) == ("world", 200, 10)
    real = module.parse_args(["--model", "smollm2", "--cache-dir", "/tmp/x"])
    scenario = module.scenario_from_args(real)
    assert (scenario.model, scenario.is_world, scenario.cache_dir) == ("smollm2", False, "/tmp/x")
    assert (scenario.conflict_pairs, scenario.num_clients, scenario.edits_per_client) == (6, 3, 2)
    assert (scenario.conflict_detection, scenario.conflict_layout, scenario.strategy) == ("hmac", "cross-client", "collabedit")
    assert scenario.memit_overrides()["fact_token"] == "subject_last"
    for bad in (["--model", "smollm2", "--quick"], ["--model-path", "/tmp"], ["--clients", "1"]):
        with pytest.raises(SystemExit):
            module.parse_args(bad)
