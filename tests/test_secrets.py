"""Secrets are never written down: not in results, checkpoints or logs (issue 21, item 7).

The run-config key ``conflict-secret`` (simulations only) keys the clients' HMAC conflict tokens.
:func:`fedke.simulations.results.redact_config` replaces its value wherever a config is written
(``results.json``, ``checkpoint.json``, benchmark JSON); the checkpoint's fingerprint records
whether a secret is set, never its value (nor a hash of it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from fedke.simulations.results import REDACTED, SECRET_KEYS, ResultsWriter, redact_config
from fedke.simulations.scenario import Scenario

SECRET = "do-not-write-me-7f3a9c-federation-secret"
OTHER = "another-secret-of-the-same-federation-42"


def _files_holding(directory, needle: str) -> list[str]:
    """Every file under ``directory`` whose bytes contain ``needle`` (as UTF-8 or UTF-16)."""
    patterns = (needle.encode(), needle.encode("utf-16-le"))
    return sorted(str(path) for path in directory.rglob("*")
                  if path.is_file() and any(pattern in path.read_bytes() for pattern in patterns))


def test_redact_config_hides_secret_values_and_nothing_else():
    assert "conflict-secret" in SECRET_KEYS and "conflict_secret" in SECRET_KEYS
    config = {"conflict-secret": SECRET, "seed": 3, "conflict-detection": "hmac",
              "nested": {"conflict_secret": SECRET, "runs": [{"federation-secret": SECRET, "x": 1}]}}
    redacted = redact_config(config)
    assert SECRET not in json.dumps(redacted)
    assert redacted["conflict-secret"] == REDACTED and redacted["nested"]["conflict_secret"] == REDACTED
    assert redacted["nested"]["runs"] == [{"federation-secret": REDACTED, "x": 1}]
    assert {k: v for k, v in redacted.items() if k != "conflict-secret" and k != "nested"} == \
        {"seed": 3, "conflict-detection": "hmac"}
    assert config["conflict-secret"] == SECRET  # the caller's config is not changed
    assert redact_config({"conflict-secret": ""}) == {"conflict-secret": ""}  # no secret: nothing to hide


def test_results_writer_redacts_the_config_it_is_given(tmp_path):
    scenario = Scenario(model="world", conflict_detection="hmac", conflict_secret=SECRET)
    writer = ResultsWriter(tmp_path, config=scenario.to_run_config(), method="collabedit")
    writer.record(1, {"ES": 100.0})
    writer.write()
    assert _files_holding(tmp_path, SECRET) == []
    assert json.loads((tmp_path / "results.json").read_text())["config"]["conflict-secret"] == REDACTED
    assert SECRET not in repr(writer.config)


def test_a_scenario_never_prints_its_secret():
    """Logging a Scenario (its repr) must not leak the secret (the field is ``repr=False``)."""
    scenario = Scenario(model="world", conflict_detection="hmac", conflict_secret=SECRET)
    assert SECRET not in repr(scenario) and SECRET not in str(scenario)



def test_a_client_conflict_agent_never_prints_its_secret():
    """A client logging its ConflictAgent must not leak the federation secret."""
    from fedke.conflict import ConflictAgent

    agent = ConflictAgent(secret=SECRET.encode())
    assert SECRET not in repr(agent) and SECRET.encode().hex() not in repr(agent)


def test_a_scenario_fingerprint_does_not_depend_on_its_secret():
    """A short hash of a weak secret could be matched against guesses: the fingerprint leaves it out."""
    world = Scenario(model="world", conflict_detection="hmac", conflict_secret=SECRET)
    assert world.fingerprint() == replace(world, conflict_secret="another-secret-of-16-bytes").fingerprint()
    assert world.fingerprint() != replace(world, num_clients=3).fingerprint()

def test_the_checkpoint_fingerprint_records_whether_a_secret_is_set_not_its_value():
    from fedke.simulations.checkpoint import fingerprint_config, run_fingerprint

    base = Scenario(model="world", conflict_detection="hmac", conflict_secret=SECRET)
    assert SECRET not in json.dumps(fingerprint_config(base))
    assert fingerprint_config(base)["conflict_secret"] == REDACTED
    # the tokens' secret changes no result (a resumed run keys its tokens afresh), so it is not in the
    # fingerprint; whether a secret is set is
    assert run_fingerprint(replace(base, conflict_secret=OTHER)) == run_fingerprint(base)
    assert run_fingerprint(replace(base, conflict_secret="")) != run_fingerprint(base)


def test_a_run_writes_the_secret_nowhere(tiny_bed, cache_dir, tmp_path, caplog, capfd):
    """A checkpointed conflict run (HMAC claims keyed by the secret), stopped after round 1 and
    resumed: no file it wrote, no log record and no output holds the secret."""
    from fedke.simulations.checkpoint import load_checkpoint
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.multiround import run_multiround

    caplog.set_level(logging.DEBUG)
    scenario = Scenario.from_preset("tiny", cache_dir=str(cache_dir), output_dir=str(tmp_path / "out"),
                                    checkpoint_dir=str(tmp_path / "ckpt"), num_rounds=2, conflict_pairs=2,
                                    conflict_detection="hmac", conflict_secret=SECRET)
    run_multiround(scenario, stop_after=1)
    assert load_checkpoint(scenario.checkpoint_dir).round == 1
    outcome = run_multiround(replace(scenario, resume=True))
    assert outcome.first_round == 2
    assert outcome.strategy.round_metrics[-1]["conflict_claims"] > 0  # the secret keyed real tokens
    run_in_process(replace(scenario, num_rounds=1, checkpoint_dir="", output_dir=str(tmp_path / "inprocess")),
                   evaluate=False)
    names = {path.name for path in tmp_path.rglob("*") if path.is_file()}
    assert {"results.json", "results.csv", "checkpoint.json", "metrics.jsonl"} <= names, names
    assert _files_holding(tmp_path, SECRET) == []
    assert caplog.records and SECRET not in caplog.text
    assert all(SECRET not in str(record.args) for record in caplog.records)
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err
    # the checkpoint and the results say a secret was set
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["conflict-secret"] == REDACTED
    assert load_checkpoint(scenario.checkpoint_dir).config["conflict_secret"] == REDACTED


def test_bench_json_is_redacted(tmp_path, load_bench):
    common = load_bench("_common")
    path = tmp_path / "bench.json"
    common.write_json(str(path), {"config": {"conflict-secret": SECRET, "seed": 0}, "metrics": {"ES": 1.0}})
    assert SECRET not in path.read_text()
    assert json.loads(path.read_text())["config"] == {"conflict-secret": REDACTED, "seed": 0}
