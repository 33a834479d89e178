"""fedke.simulations.launch / flwr_cli / processes: run-config formatting and status parsing (fast), and end-to-end
`flwr run` launches of a tiny throw-away Flower app (slow: about 20 s each on 2 cores)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from fedke.simulations import cli, flwr_cli, launch, processes
from fedke.simulations.flwr_cli import (
    RunFailed,
    RunResult,
    format_config_args,
    format_config_value,
    parse_flwr_list_json,
    parse_run_id,
    split_status,
)
from fedke.simulations.launch import run_app

flwr_config = pytest.importorskip("flwr.common.config")


# ------------------------------------------------------------------------------ formatting
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (-7, "-7"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        (300.0, "300.0"),
        ("fedavg", "'fedavg'"),
        ("a b=c", "'a b=c'"),
        ("it's", '"it\'s"'),
    ],
)
def test_format_config_value(value, text):
    assert format_config_value(value) == text


def test_format_config_args_roundtrip_through_flowers_parser():
    config = {
        "strategy": "collabedit",
        "num-clients": 10,
        "lam": 300.0,
        "ta-lambda": 1e-3,
        "ties-k": 0.2,
        "verbose": False,
        "flag": True,
        "output-dir": "/tmp/some dir/x=y",
        "quote": "it's",
        "dq": 'say "hi"',
        "backslash-and-quote": "C:\\dir\\it's",
        "multi-line": "a\nb\tc",
        "unicode": "Göteborg ✓",
        "empty": "",
        "negative": -3,
        "big": 2**40,
    }
    args = format_config_args(config)
    assert len(args) == len(config)  # one --run-config argument per key
    assert flwr_config.parse_config_args(args) == config
    # Flower also accepts them joined in one argument when no string contains whitespace.
    simple = {
        k: v for k, v in config.items() if not (isinstance(v, str) and any(c.isspace() for c in v))
    }
    joined = " ".join(format_config_args(simple))
    assert flwr_config.parse_config_args([joined]) == simple


def test_format_config_numbers_keep_their_type():
    parsed = flwr_config.parse_config_args(format_config_args({"a": 1, "b": 1.0, "c": True}))
    assert type(parsed["a"]) is int and type(parsed["b"]) is float and type(parsed["c"]) is bool


def test_format_config_rejects_what_flower_cannot_carry():
    with pytest.raises(ValueError, match="both"):
        format_config_value("it's \"quoted\"")
    with pytest.raises(TypeError):
        format_config_value(None)
    with pytest.raises(TypeError):
        format_config_value([1, 2])
    for key in ["has space", "a=b", "", "x'y"]:
        with pytest.raises(ValueError, match="invalid config key"):
            format_config_args({key: 1})
    assert format_config_args(None) == [] and format_config_args({}) == []
    assert format_config_args({"dotted.key": 1}) == ["dotted.key=1"]


def test_format_config_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert format_config_args({"a": np.int64(3), "b": np.float32(0.5), "c": np.bool_(True)}) == [
        "a=3",
        "b=0.5",
        "c=true",
    ]


# ------------------------------------------------------------------------------ output parsing
FLWR_RUN_OUTPUT = (
    "Using SuperLink: local (127.0.0.1:39091)\n"
    "\x1b[32mSuccessfully started run 4258400760530783574\x1b[0m\n"
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `4258400760530783574`\n"
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n"
)


def test_parse_run_id():
    assert parse_run_id(FLWR_RUN_OUTPUT) == 4258400760530783574
    assert parse_run_id("INFO :      Starting logstream for run_id `12`\n") == 12
    assert parse_run_id("Error: [code: 15] Invalid run configuration.") is None


def test_split_status():
    assert split_status("finished:completed") == ("finished", "completed")
    assert split_status("finished:failed") == ("finished", "failed")
    assert split_status("finished:stopped") == ("finished", "stopped")
    assert split_status("running") == ("running", "")
    assert split_status(" pending \n") == ("pending", "")


FLWR_LIST_JSON = """{
  "success": true,
  "runs": [
    {"run-id": "10801804381226192090", "fab-id": "scratch/tinyapp", "status": "finished:failed",
     "status-details": "Simulation failed with exception: boom", "elapsed": 10.4,
     "pending-at": "2026-11-21 09:47:00Z"},
    {"run-id": "1861962177894381767", "fab-id": "scratch/tinyapp", "status": "finished:completed",
     "status-details": "N/A", "elapsed": 12.1, "pending-at": "2026-11-21 09:46:40Z"}
  ]
}"""


def test_parse_flwr_list_json():
    run = parse_flwr_list_json(FLWR_LIST_JSON, 1861962177894381767)
    assert run["status"] == "finished:completed"
    run = parse_flwr_list_json("noise before\n" + FLWR_LIST_JSON, "10801804381226192090")
    assert split_status(run["status"]) == ("finished", "failed")
    assert "boom" in run["status-details"]
    assert parse_flwr_list_json(FLWR_LIST_JSON)["run-id"] == "10801804381226192090"  # newest
    with pytest.raises(LookupError):
        parse_flwr_list_json(FLWR_LIST_JSON, 1)
    with pytest.raises(LookupError):
        parse_flwr_list_json('{"success": true, "runs": []}')
    with pytest.raises(RuntimeError, match="nope"):
        parse_flwr_list_json('{"success": false, "error-message": "nope"}', 1)
    with pytest.raises(ValueError):
        parse_flwr_list_json("Error: not json")


def test_run_result_and_run_failed_message():
    log_text = "\n".join(f"line {i}" for i in range(200)) + "\nRuntimeError: boom\n"
    ok = RunResult(7, "finished", "completed", 1.0, "log")
    assert ok.ok and ok.status_text == "finished:completed"
    bad = RunResult(7, "finished", "failed", 1.0, log_text, details="Simulation failed: boom")
    assert not bad.ok
    err = RunFailed(bad)
    assert err.result is bad
    msg = str(err)
    assert "'finished:failed'" in msg and "Simulation failed: boom" in msg
    assert msg.rstrip().endswith("RuntimeError: boom") and "line 100" not in msg
    assert not RunResult(None, "running", "", 1.0, "").ok


# ------------------------------------------------------------------------------ validation
def test_run_app_refuses_a_legacy_federations_section(tmp_path):
    app = _write_tiny_app(tmp_path / "app")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text()
        + '\n[tool.flwr.federations]\ndefault = "local"\n\n'
        + "[tool.flwr.federations.local]\noptions.num-supernodes = 2\n"
    )
    before = pyproject.read_text()
    with pytest.raises(ValueError, match="federations"):
        run_app(app, num_supernodes=2, flwr_home=tmp_path / "home")
    assert pyproject.read_text() == before  # untouched; nothing was started
    assert not (tmp_path / "home").exists()


def test_run_app_validates_arguments(tmp_path):
    app = _write_tiny_app(tmp_path / "app")
    for n in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="num_supernodes"):
            run_app(app, num_supernodes=n)
    with pytest.raises(FileNotFoundError):
        run_app(tmp_path / "nowhere", num_supernodes=2)
    with pytest.raises(TypeError):
        run_app(app, num_supernodes=2, run_config={"label": None})


# ------------------------------------------------------------------------------ end to end
TINY_PYPROJECT = """\
[project]
name = "launch-tinyapp"
version = "0.1.0"
description = "Throw-away Flower app for fedke's launcher tests"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedke-tests"

[tool.flwr.app.components]
serverapp = "launch_tinyapp.server_app:app"
clientapp = "launch_tinyapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
fail = false
label = "hello"
"""

TINY_SERVER = """\
import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg


def server_fn(context: Context):
    rc = context.run_config
    print(f"LAUNCH-TINYAPP server label={rc['label']}", flush=True)
    if rc["fail"]:
        raise RuntimeError("LAUNCH-TINYAPP deliberate failure")
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=2,
        min_available_clients=2,
        initial_parameters=ndarrays_to_parameters([np.zeros(3, dtype=np.float32)]),
    )
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=int(rc["num-server-rounds"]))
    )


app = ServerApp(server_fn=server_fn)
"""

TINY_CLIENT = """\
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context


class TinyClient(NumPyClient):
    def __init__(self, partition_id):
        self.partition_id = partition_id

    def fit(self, parameters, config):
        print(f"LAUNCH-TINYAPP fit partition={self.partition_id}", flush=True)
        return [p + 1.0 for p in parameters], 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def client_fn(context: Context):
    return TinyClient(context.node_config.get("partition-id", -1)).to_client()


app = ClientApp(client_fn=client_fn)
"""


def _write_tiny_app(app_dir: Path) -> Path:
    """A Flower app installed nowhere: `flwr run` ships it as a FAB into $FLWR_HOME/apps."""
    package = app_dir / "launch_tinyapp"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(TINY_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server_app.py").write_text(TINY_SERVER)
    (package / "client_app.py").write_text(TINY_CLIENT)
    return app_dir


def _pids_with_flwr_home(home: Path) -> set[int]:
    return processes.processes_with_flwr_home(home)


class _ProcessWatch:
    """Samples, in a thread, the processes carrying FLWR_HOME=<home> while a run goes."""

    def __init__(self, home: Path):
        self.home, self.seen, self._stop = home.resolve(), set(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            found = _pids_with_flwr_home(self.home)
            # Ray's agents rename themselves (setproctitle), which can hide their environment:
            # take the descendants of what was found too.
            for pid in list(found):
                found.update(processes.descendants(pid))
            self.seen |= found
            time.sleep(0.5)

    def alive(self) -> list[int]:
        return [pid for pid in sorted(self.seen) if processes.is_alive(pid)]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


@pytest.mark.slow
@needs_proc
def test_run_app_end_to_end_success(tmp_path, capsys):
    app = _write_tiny_app(tmp_path / "app")
    home = tmp_path / "flwr-home"
    with _ProcessWatch(home) as watch:
        result = run_app(
            app,
            num_supernodes=2,
            run_config={"num-server-rounds": 1, "label": "a b=c"},
            flwr_home=home,
            timeout_s=300,
        )
    assert result.ok, result.log_tail()
    assert (result.status, result.sub_status) == ("finished", "completed")
    assert isinstance(result.run_id, int) and result.run_id > 0
    assert 0 < result.seconds < 300
    # The ServerApp's prints and the ClientApps' prints both reach the streamed log.
    assert "LAUNCH-TINYAPP server label=a b=c" in result.log_text
    assert result.log_text.count("LAUNCH-TINYAPP fit partition=") == 2
    assert "(2 simulated SuperNodes)" in result.log_text
    assert "\x1b[" not in result.log_text
    assert "LAUNCH-TINYAPP server" in capsys.readouterr().out  # stream=True echoes it
    # Everything happened in the given Flower home, and nothing of it survives the call.
    assert (home / "config.toml").is_file()
    assert (home / "local-superlink" / "superlink.log").is_file()
    assert result.flwr_home == str(home.resolve())
    assert len(watch.seen) >= 4, f"the watch saw too few Flower processes: {watch.seen}"
    assert watch.alive() == []
    assert _pids_with_flwr_home(home.resolve()) == set()


@pytest.mark.slow
@needs_proc
def test_run_app_failing_serverapp_raises_run_failed(tmp_path):
    app = _write_tiny_app(tmp_path / "app")
    home = tmp_path / "flwr-home"
    with pytest.raises(RunFailed) as info:
        run_app(app, num_supernodes=2, run_config={"fail": True}, flwr_home=home,
                timeout_s=300, stream=False)
    result = info.value.result
    assert (result.status, result.sub_status) == ("finished", "failed")
    assert "LAUNCH-TINYAPP deliberate failure" in result.details
    assert "LAUNCH-TINYAPP deliberate failure" in str(info.value)  # traceback in the log tail
    assert _pids_with_flwr_home(home.resolve()) == set()


@pytest.mark.slow
@needs_proc
def test_run_flower_refuses_is_run_failed_not_started(tmp_path, monkeypatch):
    """Without our key check, Flower refuses an unknown run-config key at StartRun (no Ray)."""
    monkeypatch.setattr(launch, "check_run_config_keys", lambda *a: None)
    app = _write_tiny_app(tmp_path / "app")
    home = tmp_path / "flwr-home"
    with pytest.raises(RunFailed) as info:
        run_app(app, num_supernodes=2, run_config={"no-such-key": 1}, flwr_home=home,
                stream=False)
    result = info.value.result
    assert result.run_id is None and result.status == "not-started"
    assert "no-such-key" in result.details  # from the SuperLink's log
    assert "Invalid run configuration" in result.log_text
    assert _pids_with_flwr_home(home.resolve()) == set()


def test_cli_unknown_run_config_key_fails_before_starting(tmp_path, capsys):
    app = _write_tiny_app(tmp_path / "app")
    home = tmp_path / "flwr-home"
    code = cli.main(["run", "-n", "2", "-c", "no-such-key=1", "--flwr-home", str(home), str(app)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no-such-key" in err and "num-server-rounds" in err
    assert not home.exists()


def test_cli_config_parsing_merges_presets_and_overrides(tmp_path):
    preset = tmp_path / "preset.toml"
    preset.write_text('num-server-rounds = 3\nlabel = "preset"\n[sub]\nx = 1.5\n')
    merged = flwr_cli.read_overrides([str(preset), "label='cli x' fail=true"])
    assert merged == {"num-server-rounds": 3, "label": "cli x", "fail": True, "sub.x": 1.5}
    expected = {"num-server-rounds": 3, "label": "preset", "sub.x": 1.5}
    assert flwr_cli.load_run_config(preset) == expected


@pytest.mark.slow
@needs_proc
def test_run_app_timeout_stops_everything(tmp_path):
    """A run over its time limit is stopped and RunTimedOut raised; nothing is left behind."""
    app = _write_tiny_app(tmp_path / "app")
    client = app / "launch_tinyapp" / "client_app.py"  # a ClientApp stuck in fit (in a Ray actor)
    client.write_text(client.read_text().replace(
        "    def fit(self, parameters, config):\n",
        "    def fit(self, parameters, config):\n        import time\n        time.sleep(600)\n",
    ))
    assert "time.sleep(600)" in client.read_text()
    home = tmp_path / "flwr-home"
    t0 = time.monotonic()
    with _ProcessWatch(home) as watch, pytest.raises(flwr_cli.RunTimedOut):
        run_app(app, num_supernodes=2, flwr_home=home, timeout_s=25, stream=False)
    assert time.monotonic() - t0 < 60
    assert watch.seen and watch.alive() == []
    assert _pids_with_flwr_home(home.resolve()) == set()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
