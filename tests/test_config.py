"""The typed run configuration (issue 21, item 4): every key is checked when it is read.

A value of the wrong type, out of range, not among its key's choices, or an unknown key is refused
with :class:`ConfigError` naming the user's key; nothing is coerced silently. ``fedke run`` checks
the whole config before any SuperLink starts, and ``fedke run`` / ``fedke compare`` read ``-c``
through one parser.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from fedke.simulations import cli, flwr_cli
from fedke.simulations.scenario import ConfigError, Scenario, config_key

APP_DIR = Path(__file__).parents[1]
WORLD = {"model": "world"}  # no real-model file is read while a scenario is built on the world


def refused(key: str, value, match: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Scenario.from_run_config({**WORLD, key: value})
    message = str(caught.value)
    assert message.startswith(f"{key} must"), message
    if match is not None:
        assert match in message, message
    return caught.value


# ------------------------------------------------------------------------------------------ types
@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("False", False)])
def test_booleans_accept_only_true_and_false(value, expected):
    assert Scenario.from_run_config({**WORLD, "forgetting": value}).forgetting is expected


@pytest.mark.parametrize("value", ["no", "yes", "0", 1, 0, 1.0, ""])
def test_a_boolean_refuses_anything_else(value):
    # bool("false") is True: the old reader turned forgetting = "false" into a forgetting run
    refused("forgetting", value, "true or false")


@pytest.mark.parametrize("value", [2.7, 3.0, True, "three", "2.5", None])
def test_an_integer_refuses_fractions_bools_and_words(value):
    refused("num-clients", value, "whole number")


def test_an_integer_accepts_an_int_or_its_digits():
    assert Scenario.from_run_config({**WORLD, "num-clients": "3"}).num_clients == 3
    assert Scenario.from_run_config({**WORLD, "num-clients": 3}).num_clients == 3


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_a_number_must_be_finite(value):
    refused("lam", value, "finite")


@pytest.mark.parametrize("value", [True, "a lot", None])
def test_a_number_refuses_bools_and_words(value):
    refused("ta-lambda", value, "a number")


def test_numbers_accept_ints_and_numeric_strings():
    scenario = Scenario.from_run_config({**WORLD, "lam": 300, "ties-k": "0.5"})
    assert (scenario.lam, scenario.ties_k) == (300.0, 0.5)
    assert isinstance(scenario.lam, float)


# ----------------------------------------------------------------------------------- ranges, choices
@pytest.mark.parametrize("key, value, match", [
    ("lam", -1.0, "at least 0"),
    ("num-clients", 0, "at least 1"),
    ("model-layers", 0, "at least 1"),
    ("model-width", 0, "at least 1"),
    ("ties-k", 1.5, "at most 1"),
    ("ties-k", 0.0, "greater than 0"),
    ("beta0", 0.0, "greater than 0"),
    ("beta1", -0.5, "at least 0"),
    ("secagg-clip", -8.0, "greater than 0"),
    ("conflict-pairs", -1, "at least 0"),
    ("covariance-tokens", -5, "at least 0"),
])
def test_values_out_of_range_are_refused_naming_the_key(key, value, match):
    refused(key, value, match)


@pytest.mark.parametrize("key, value", [
    ("strategy", "median"),
    ("editor-mode", "parallel"),
    ("fact-token", "first"),
    ("layerwise", "maybe"),
    ("covariance", "adaptive"),
    ("wire-dtype", "bfloat16"),
    ("partitioning", "dirichlet"),
    ("conflict-detection", "on"),
    ("conflict-policy", "random"),
    ("conflict-layout", "diagonal"),
])
def test_unknown_choices_are_refused_listing_the_allowed_ones(key, value):
    error = refused(key, value, "one of")
    spec = next(s for s in fields(Scenario) if config_key(s.name) == key)
    assert all(repr(choice) in str(error) for choice in spec.metadata["choices"])


def test_layerwise_reads_toml_bools_and_any_case():
    sequential = {**WORLD, "editor-mode": "sequential"}
    assert Scenario.from_run_config({**sequential, "layerwise": True}).layerwise == "true"
    assert Scenario.from_run_config({**sequential, "layerwise": " False "}).layerwise == "false"


def test_model_width_must_split_into_heads():
    with pytest.raises(ConfigError, match="model-width must be divisible"):
        Scenario(model="world", model_width=100)


def test_unknown_key_is_refused_naming_it():
    with pytest.raises(ConfigError, match="unknown run-config key 'num-client'"):
        Scenario.from_run_config({"num-client": 4})


def test_every_default_passes_its_own_rules():
    scenario = Scenario()
    for spec in fields(Scenario):
        assert getattr(scenario, spec.name) == spec.default


def test_config_errors_are_value_errors():
    """Callers that caught ValueError keep working."""
    assert issubclass(ConfigError, ValueError)


def test_a_bad_secret_is_refused_without_showing_it():
    secret = 1234567890123
    with pytest.raises(ConfigError) as caught:
        Scenario.from_run_config({**WORLD, "conflict-secret": [secret]})
    assert str(secret) not in str(caught.value) and "conflict-secret" in str(caught.value)


# ------------------------------------------------------------------------------- the -c parser
def test_read_overrides_reads_toml_values_and_bare_words(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('num-clients = 3\nstrategy = "ties"\n')
    merged = flwr_cli.read_overrides([str(preset), "strategy=fedavg lam=300.0 forgetting=false name='a b'"])
    assert merged == {"num-clients": 3, "strategy": "fedavg", "lam": 300.0, "forgetting": False, "name": "a b"}


@pytest.mark.parametrize("argument, match", [
    ("lam", "expected key=value"),
    ("lam=[1", "not a TOML"),
    ("missing.toml", "no such run-config file"),
])
def test_read_overrides_names_the_argument_it_cannot_read(argument, match):
    with pytest.raises(ValueError, match=match):
        flwr_cli.read_overrides([argument])


def test_fedke_run_refuses_a_bad_setting_before_starting_flower(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(cli, "run_app", lambda *args, **kwargs: started.append(args))
    assert cli.main(["run", "-c", "lam=-1", str(APP_DIR)]) == 2
    assert cli.main(["run", "-c", "forgetting='no'", str(APP_DIR)]) == 2
    assert cli.main(["run", "-c", "num-clients=2.7", str(APP_DIR)]) == 2
    assert started == []
    err = capsys.readouterr().err
    assert "lam must be at least 0" in err and "forgetting must be true or false" in err
    assert "num-clients must be a whole number" in err


def test_fedke_run_passes_a_good_config_on_with_one_supernode_per_client(monkeypatch):
    started = []

    class Finished:
        run_id, status_text, details, seconds = 1, "finished:completed", "", 0.0

    monkeypatch.setattr(cli, "run_app", lambda app_dir, **kwargs: started.append((app_dir, kwargs)) or Finished())
    assert cli.main(["run", "-c", "num-clients=3 model='world'", str(APP_DIR)]) == 0
    [(app_dir, kwargs)] = started
    assert app_dir == str(APP_DIR) and kwargs["num_supernodes"] == 3
    assert kwargs["run_config"] == {"num-clients": 3, "model": "world"}


def test_fedke_compare_reads_c_through_the_same_parser(monkeypatch, capsys):
    from fedke.simulations import inprocess

    monkeypatch.setattr(inprocess, "compare_methods", lambda scenario: pytest.fail("compare ran"))
    assert cli.main(["compare", "--preset", "tiny", "-c", "ties-k=1.5"]) == 2
    assert cli.main(["compare", "--preset", "tiny", "-c", "lam"]) == 2
    err = capsys.readouterr().err
    assert "ties-k must be at most 1" in err and "expected key=value" in err


def test_read_results_keeps_the_metric_na_a_name_in_csv_and_parquet(tmp_path):
    """``NA`` (neighbourhood accuracy) is a metric name; plain ``pd.read_csv`` reads it as NaN."""
    import pandas as pd

    from fedke.simulations.results import ResultsWriter, read_results

    writer = ResultsWriter(tmp_path)
    writer.record(1, {"NS": 80.0, "NA": 40.0}, method="collabedit")
    writer.write()
    assert pd.read_csv(tmp_path / "results.csv")["metric"].isna().any()  # the trap read_results avoids
    for path in (tmp_path, tmp_path / "results.csv", tmp_path / "results.parquet"):
        table = read_results(path)
        assert dict(zip(table["metric"], table["value"])) == {"NS": 80.0, "NA": 40.0}
