"""Flower simulation (``flwr run`` via fedke's launcher) versus the plain in-process loop.

    python bench/simulation.py --out simulation.json [--quick]

For each number of clients N (default 10 and 100; ``--quick``: 3 and 6) the same scenario runs
twice: through Flower's simulation engine (:func:`fedke.simulations.launch.run_app` on the
repository's own app, one simulated SuperNode per client, a private SuperLink, Ray) and through
:func:`fedke.simulations.inprocess.run_in_process` (the same clients and strategy in a plain
loop, in a fresh child process so that its peak RSS is its own). Nothing is added to the app:

* **seconds per round** (``per_round_s``) is measured after start-up and after the first round,
  as ``(end of round R - end of round 1) / (R - 1)``. A round is: every client edits, the server
  decodes and merges, and the server's oracle evaluation of the global model runs (the same
  work in both engines). For Flower the end of round r is the ``elapsed`` field of the
  ServerApp's own ``fit progress: (r, loss, metrics, elapsed)`` log line (seconds since the
  ServerApp's round loop started); for the in-process loop it is the moment its evaluation of
  round r returns (timed by wrapping ``inprocess.evaluate_update`` in the child process).
  When the ServerApp also runs a federated evaluation round after each round (every client
  evaluates its own requests; ``run_in_process`` does not), that is in Flower's rounds too, so
  the in-process baseline for the ratio (``per_round_same_work_s``) adds the clients' own
  evaluation time, measured in the child after the loop (``client_eval_s_per_round``).
* **start-up** for Flower is the arrival of the ServerApp's ``[ROUND 1]`` log line, timed from
  the ``run_app`` call (SuperLink start, FAB build and install, Ray start, the ServerApp loading
  the world model); the streamed log arrives in bursts, so phase times from line arrival are
  approximate (about 1 s). ``first_round_s`` is the ServerApp's own elapsed time of round 1 (it
  includes starting the ClientApp actor(s) and loading the model there). For in-process,
  start-up is the time until the last client is built (world model and statistics loaded).
* **peak RSS**: for Flower, the largest sum over all processes of the run (SuperLink,
  SuperExec, ``flwr run``, ``flwr-simulation`` with the ServerApp, Ray's GCS, raylet, dashboard
  and ClientApp actors), sampled every ``--sample-s`` seconds; a process belongs to the run when
  its environment carries the run's private ``FLWR_HOME`` or it descends from one that does.
  RSS sums count shared pages (libraries, Ray's object store) once per process; the PSS sum,
  which does not, is reported alongside. For in-process, the child's ``ru_maxrss``.

Threads: every process of both engines gets ``--threads`` intra-op threads (default 1, via
``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``, which Ray respects, and
``torch.set_num_threads`` in the in-process child). Flower's default client resources (2 CPUs
per ClientApp actor) give ONE actor on a 2-core machine, so both engines then run the clients
one after another on one thread each: the difference is orchestration. ``--federation-config
client-resources-num-cpus=1`` gives one actor per core instead (clients in parallel).

The world: ``--preset`` (default ``tiny``, the tests' world: 120 subjects x 3 relations, a
3-layer 64-wide GPT-2) plus ``-c`` overrides; N x edits-per-client x rounds must fit in the
world's (subject, relation) pairs, so the default edits per client is 2 where that fits and 1
otherwise (1 for N = 100 on the tiny world). Overriding the world size or model trains and
caches a new world model on first use. ``--cache-dir`` picks the model cache (default:
``$FEDKE_CACHE`` or ``~/.cache/fedke``).

Writes ``{"flower": {"<N>": {...}}, "inprocess": {"<N>": {...}}, "overhead_ratio_n10": x,
"overhead_ratio_n10_vs_run_in_process_alone": x0, "rss_ratio_n100_over_n10": y, "targets": {...},
"config": {...}}`` (``config.measured`` says what each figure is). The ratio keys keep those
names in every mode; they are computed at the smallest and largest N of the run
(``config.ratio_clients``: [3, 6] with ``--quick``). Targets (the issue): overhead ratio at most
1.3, RSS ratio at most 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TARGET_OVERHEAD = 1.3
TARGET_RSS = 1.5
_FIT_PROGRESS = re.compile(r"fit progress: \((\d+), .*, ([0-9.eE+-]+)\)\s*$")
_RUN_FINISHED = re.compile(r"Run finished (\d+) round\(s\) in ([0-9.]+)s")


# ----------------------------------------------------------------------------- the scenario
def scenario_config(args, n_clients: int) -> dict:
    """The run config (flat ``[tool.flwr.app.config]`` keys) for ``n_clients``."""
    from fedke.simulations.flwr_cli import load_run_config, read_overrides
    from fedke.simulations.scenario import PRESET_DIR

    preset = Path(args.preset)
    if not preset.exists():
        preset = PRESET_DIR / f"{args.preset}.toml"
    config = load_run_config(preset)
    config.update(read_overrides(args.config))
    config.update({"num-clients": n_clients, "num-rounds": args.rounds, "strategy": args.strategy})
    if args.cache_dir:
        config["cache-dir"] = str(Path(args.cache_dir).resolve())
    return config


def edits_per_client(args, config: dict, largest_n: int) -> int:
    if args.edits_per_client:
        return args.edits_per_client
    from fedke.simulations.scenario import Scenario

    base = Scenario.from_run_config({**config, "edits-per-client": 1, "num-clients": 1})
    capacity = base.world_subjects * base.world_relations
    fits = capacity // (largest_n * args.rounds)
    if fits < 1:
        raise SystemExit(f"{largest_n} clients x {args.rounds} rounds do not fit in the world's "
                         f"{capacity} (subject, relation) pairs: raise world-subjects with -c")
    return min(2, fits)


def thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def steady_per_round(round_ends: list[float]) -> float | None:
    if len(round_ends) < 2:
        return None
    return (round_ends[-1] - round_ends[0]) / (len(round_ends) - 1)


def merge_seconds(csv_path: Path) -> list[float]:
    """The strategy's own ``aggregate_seconds`` per round (decode + merge), from results.csv."""
    from fedke.simulations.results import read_results

    if not csv_path.is_file():
        return []
    table = read_results(csv_path)
    rows = table[(table["request_set"] == "merge") & (table["metric"] == "aggregate_seconds")]
    return [float(v) for v in rows.sort_values("round")["value"]]


# ----------------------------------------------------------------------------- in-process child
def inprocess_worker(config: dict, threads: int) -> dict:
    """Runs in a fresh child process: run_in_process with round-end timestamps; returns figures."""
    import torch

    torch.set_num_threads(threads)
    import fedke.simulations.inprocess as ip
    from fedke.simulations.scenario import Scenario

    marks: dict[str, list[float]] = {"eval_start": [], "eval_end": [], "client_built": []}
    evaluate_update, make_client = ip.evaluate_update, ip.make_client

    def timed_evaluate(*a, **kw):
        marks["eval_start"].append(time.perf_counter())
        try:
            return evaluate_update(*a, **kw)
        finally:
            marks["eval_end"].append(time.perf_counter())
            marks.setdefault("cpu_at_eval_end", []).append(time.process_time())

    def timed_make_client(*a, **kw):
        try:
            return make_client(*a, **kw)
        finally:
            marks["client_built"].append(time.perf_counter())

    ip.evaluate_update, ip.make_client = timed_evaluate, timed_make_client
    scenario = Scenario.from_run_config(config)
    t0 = time.perf_counter()
    outcome = ip.run_in_process(scenario, output_dir=config["output-dir"])
    total = time.perf_counter() - t0
    startup = marks["client_built"][-1] - t0
    # What a federated evaluation round costs without Flower (the ServerApp may ask every client
    # to evaluate its own requests after each round; run_in_process does not): each client
    # evaluates its requests of rounds 1..r on the global update, for r = 1..R-1 (the rounds
    # whose federated evaluation falls between the ends of round 1 and round R).
    from flwr.common import parameters_to_ndarrays

    parameters = parameters_to_ndarrays(outcome.strategy.update_parameters())
    clients = [make_client(scenario, cid) for cid in range(scenario.effective_clients)]
    tic = time.perf_counter()
    for server_round in range(1, scenario.num_rounds):
        for client in clients:
            client.evaluate(parameters, {"server_round": server_round})
    client_eval = (time.perf_counter() - tic) / max(1, scenario.num_rounds - 1)
    ends = [t - t0 for t in marks["eval_end"]]
    evals = [e - s for s, e in zip(marks["eval_start"], marks["eval_end"])]
    return {
        "total_s": total,
        "startup_s": startup,
        "first_round_s": ends[0] - startup,
        "per_round_s": steady_per_round(ends),
        "round_end_s": ends,
        "client_eval_s_per_round": client_eval,
        "fit_merge_s": list(outcome.seconds_per_round),
        "eval_s": evals,
        "aggregate_s": merge_seconds(Path(config["output-dir"]) / "results.csv"),
        "cpu_s_per_round": steady_per_round(marks["cpu_at_eval_end"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "summary": {k: float(v) for k, v in outcome.summary.iloc[0].items()},
    }


def run_inprocess(config: dict, threads: int) -> dict:
    env = {**os.environ, **thread_env(threads)}
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [sys.executable, __file__, "--inprocess-worker", json.dumps(config), "--threads", str(threads)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"in-process worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started  # with Python and torch imports
    return result


# ----------------------------------------------------------------------------- Flower
def _proc_stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_proc_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue
    return children


_KIND_RULES = (  # (test on the command line, kind); the first match wins
    (lambda a, t: t.startswith("ray::ClientAppActor"), "ray::ClientAppActor"),
    (lambda a, t: t.startswith("ray::IDLE"), "ray idle worker"),
    (lambda a, t: "default_worker.py" in t or "setup_worker.py" in t, "ray worker (starting)"),
    (lambda a, t: t.startswith("ray::DashboardAgent") or "dashboard/agent.py" in t, "ray dashboard agent"),
    (lambda a, t: t.startswith("ray::RuntimeEnvAgent") or "runtime_env/agent" in t, "ray runtime_env agent"),
    (lambda a, t: "dashboard/dashboard.py" in t, "ray dashboard"),
    (lambda a, t: "log_monitor.py" in t, "ray log_monitor"),
    (lambda a, t: "autoscaler/_private/monitor.py" in t, "ray monitor"),
    (lambda a, t: a and a[0].endswith("/gcs_server"), "ray gcs_server"),
    (lambda a, t: a and a[0].endswith("/raylet"), "raylet"),
    (lambda a, t: any(x.endswith("/flower-superlink") for x in a[:2]), "flower-superlink"),
    (lambda a, t: any(x.endswith("/flower-superexec") for x in a[:2]), "flower-superexec"),
    (lambda a, t: any(x.endswith("/flwr-simulation") for x in a[:2]), "flwr-simulation (ServerApp)"),
    (lambda a, t: len(a) > 2 and a[1].endswith("/flwr") and a[2] == "run", "flwr run (CLI)"),
    (lambda a, t: len(a) > 1 and a[1].endswith("/flwr"), "flwr (CLI, status)"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_kind(pid: int) -> str | None:
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    text = " ".join(argv).strip()
    if not text:  # exiting (or a kernel thread): keep the name seen before
        return None
    for test, kind in _KIND_RULES:
        if test(argv, text):
            return kind
    return comm or "?"


class RunSampler:
    """Samples, in a thread, the processes of one Flower run (by FLWR_HOME): memory and CPU time.

    ``cpu_series`` holds (seconds since ``t0``, {pid: cumulative CPU seconds}); ``kinds`` the
    last name seen per pid (Ray workers rename themselves, e.g. to ``ray::ClientAppActor``).
    """

    def __init__(self, home: Path, interval_s: float, t0: float):
        self.marker = f"FLWR_HOME={home}".encode()
        self.interval_s, self.t0 = interval_s, t0
        self.known: set[int] = set()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_breakdown: dict[str, float] = {}
        self.samples = 0
        self.max_processes = 0
        self.kinds: dict[int, str] = {}
        self.actor_pids: set[int] = set()
        self.threads_env: dict[str, str] = {}
        self.cpu_series: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _find(self) -> set[int]:
        found = set()
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                if self.marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
        # Ray's processes rename themselves (setproctitle), which can hide their environment.
        children = _children_map()
        stack = list(found | {p for p in self.known if Path(f"/proc/{p}").exists()})
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        return found

    def _sample(self) -> None:
        pids = self._find()
        self.known |= pids
        rss_total, pss_total, breakdown, live, cpu = 0, 0, {}, 0, {}
        for pid in pids:
            try:
                fields = _proc_stat_fields(pid)
                if fields[0] == "Z":
                    continue
                cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            except (OSError, IndexError, ValueError):
                continue
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                pss = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
            except (OSError, AttributeError):
                pss = rss
            live += 1
            kind = _process_kind(pid) or self.kinds.get(pid, "?")
            self.kinds[pid] = kind
            if kind == "ray::ClientAppActor" and pid not in self.actor_pids:
                self.actor_pids.add(pid)
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    self.threads_env = {k.decode(): v.decode() for k, _, v in (e.partition(b"=") for e in env)
                                        if k in (b"OMP_NUM_THREADS", b"MKL_NUM_THREADS")}
                except OSError:
                    pass
            rss_total += rss
            pss_total += pss
            breakdown[kind] = breakdown.get(kind, 0.0) + rss / 2**20
        self.cpu_series.append((time.perf_counter() - self.t0, cpu))
        self.samples += 1
        self.max_processes = max(self.max_processes, live)
        self.peak_pss = max(self.peak_pss, pss_total)
        if rss_total > self.peak_rss:
            self.peak_rss, self.peak_breakdown = rss_total, breakdown

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as err:  # noqa: BLE001 - sampling must never break the run
                print(f"sampler: {err!r}", file=sys.stderr)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _cumulative(self, t: float | None) -> dict[int, float]:
        cumulative: dict[int, float] = {}
        for when, cpu in self.cpu_series:
            if t is not None and when > t:
                break
            cumulative.update(cpu)  # a process that ended keeps its last value
        return cumulative

    def cpu_by_kind(self, start: float | None = None, end: float | None = None) -> dict[str, float]:
        """CPU seconds used per kind of process between two times (seconds since ``t0``)."""
        first = self._cumulative(start) if start is not None else {}
        last = self._cumulative(end)
        out: dict[str, float] = {}
        for pid, value in last.items():
            kind = self.kinds.get(pid, "?")
            out[kind] = out.get(kind, 0.0) + value - first.get(pid, 0.0)
        return dict(sorted(((k, round(v, 2)) for k, v in out.items() if v > 0.005), key=lambda kv: -kv[1]))


class _TimedLines:
    """A stand-in ``sys.stdout`` for run_app's log echo: keeps (arrival time, line)."""

    def __init__(self, t0: float, echo):
        self.t0, self.echo, self.lines, self._buffer = t0, echo, [], ""

    def write(self, text: str) -> int:
        now = time.perf_counter() - self.t0
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.lines.append((now, line))
            if self.echo is not None:
                self.echo.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def run_flower(config: dict, n_clients: int, args) -> dict:
    from fedke.simulations.flwr_cli import read_overrides
    from fedke.simulations.launch import run_app

    home = Path(tempfile.mkdtemp(prefix="fedke-bench-flwr-home-")).resolve()
    federation = read_overrides(args.federation_config)
    saved = {k: os.environ.get(k) for k in thread_env(args.threads)}
    os.environ.update(thread_env(args.threads))  # inherited by every Flower process
    t0 = time.perf_counter()
    out = _TimedLines(t0, sys.stderr if args.verbose else None)
    real_stdout = sys.stdout
    try:
        with RunSampler(home, args.sample_s, t0) as sampler:
            sys.stdout = out
            try:
                result = run_app(REPO, num_supernodes=n_clients, run_config=config,
                                 federation_config=federation, flwr_home=home,
                                 timeout_s=args.timeout, stream=True)
            finally:
                sys.stdout = real_stdout
        total = time.perf_counter() - t0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(home, ignore_errors=True)
    ends = {}
    for _, line in out.lines:
        match = _FIT_PROGRESS.search(line)
        if match:
            ends[int(match.group(1))] = float(match.group(2))
    round_ends = [ends[r] for r in sorted(ends)]
    finished = next((float(m.group(2)) for _, line in out.lines if (m := _RUN_FINISHED.search(line))), None)
    line_ends = [t for t, line in out.lines if _FIT_PROGRESS.search(line)]
    round1 = out.first("[ROUND 1]")
    return {
        "total_s": total,
        "startup_s": round1,  # from the run_app call to the [ROUND 1] line (approximate)
        "phases_s": {  # arrival of log lines, seconds from the run_app call (approximate)
            "run_started": out.first("Successfully started run"),
            "simulation_started": out.first("Starting Flower Simulation"),
            "serverapp_started": out.first("Starting Flower ServerApp"),
            "round_1": round1,
            "last_round_end": line_ends[-1] if line_ends else None,
            "run_app_returned": total,
        },
        "first_round_s": round_ends[0] if round_ends else None,
        "per_round_s": steady_per_round(round_ends),
        "per_round_from_line_arrival_s": steady_per_round(line_ends),
        "round_end_s": round_ends,  # the ServerApp's own elapsed time at each round's end
        "rounds_loop_s": finished,
        # the ServerApp asked the clients to evaluate (a federated evaluation round per round)
        "federated_evaluation": any("configure_evaluate: strategy sampled" in line for _, line in out.lines),
        "teardown_s": total - line_ends[-1] if line_ends else None,
        "aggregate_s": merge_seconds(Path(config["output-dir"]) / "results.csv"),
        "peak_rss_mb": sampler.peak_rss / 2**20,
        "peak_pss_mb": sampler.peak_pss / 2**20,
        "peak_rss_by_process_mb": dict(sorted(sampler.peak_breakdown.items(), key=lambda kv: -kv[1])),
        "cpu_s_by_process": sampler.cpu_by_kind(),
        # CPU used between the arrival of round 1's and the last round's 'fit progress' lines
        "cpu_s_per_round_after_round_1_by_process": {
            k: round(v / (len(line_ends) - 1), 3)
            for k, v in sampler.cpu_by_kind(line_ends[0], line_ends[-1]).items()
        } if len(line_ends) > 1 else {},
        "cpu_s_per_round": (sum(sampler.cpu_by_kind(line_ends[0], line_ends[-1]).values())
                            / (len(line_ends) - 1)) if len(line_ends) > 1 else None,
        "processes_seen": len(sampler.known),
        "max_live_processes": sampler.max_processes,
        "client_actors": len(sampler.actor_pids),
        "actor_thread_env": sampler.threads_env,
        "rss_samples": sampler.samples,
        "run_id": result.run_id,
        "status": result.status_text,
        "summary": _flower_summary(Path(config["output-dir"])),
    }


def _flower_summary(out_dir: Path) -> dict:
    try:
        summary = json.loads((out_dir / "results.json").read_text())["summary"]
        return {k: float(v) for k, v in next(iter(summary.values())).items()}
    except (OSError, StopIteration, KeyError, ValueError):
        return {}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="N in {3, 6} on the tiny preset")
    parser.add_argument("--clients", type=int, nargs="+", help="numbers of clients (default 10 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edits-per-client", type=int, default=None,
                        help="default: 2 where the world has room, else 1")
    parser.add_argument("--strategy", default="collabedit")
    parser.add_argument("--preset", default="tiny", help="a preset name or .toml path (default tiny)")
    parser.add_argument("-c", "--config", action="append", metavar="'K=V ...'",
                        help="run-config overrides, flwr syntax (repeatable)")
    parser.add_argument("--federation-config", action="append", metavar="'K=V'",
                        help="Flower simulation settings, e.g. client-resources-num-cpus=1")
    parser.add_argument("--cache-dir", default=None, help="world-model cache (default $FEDKE_CACHE "
                        "or ~/.cache/fedke)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--sample-s", type=float, default=0.25, help="RSS sampling period")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per Flower run, seconds")
    parser.add_argument("--engines", nargs="+", default=["inprocess", "flower"], choices=["inprocess", "flower"])
    parser.add_argument("-v", "--verbose", action="store_true", help="echo Flower's log to stderr")
    parser.add_argument("--inprocess-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.inprocess_worker:
        print(json.dumps(inprocess_worker(json.loads(args.inprocess_worker), args.threads)), flush=True)
        return {}

    clients = sorted(args.clients or ([3, 6] if args.quick else [10, 100]))
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (per-round time is measured after round 1)")
    base = scenario_config(args, clients[0])
    per_client = edits_per_client(args, base, clients[-1])
    work = Path(tempfile.mkdtemp(prefix="fedke-bench-sim-"))
    results: dict[str, dict[str, dict]] = {"flower": {}, "inprocess": {}}
    try:
        for n in clients:
            for engine in args.engines:
                config = {**scenario_config(args, n), "edits-per-client": per_client,
                          "output-dir": str(work / f"{engine}-{n}")}
                print(f"N={n}: {engine} ...", file=sys.stderr, flush=True)
                if engine == "inprocess":
                    row = run_inprocess(config, args.threads)
                else:
                    row = run_flower(config, n, args)
                results[engine][str(n)] = row
                print(f"N={n}: {engine}: {row['total_s']:.1f} s total, {row['per_round_s']:.2f} s/round after "
                      f"round 1, peak RSS {row['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    small, large = str(clients[0]), str(clients[-1])
    flower, inproc = results["flower"], results["inprocess"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    def baseline(n: str) -> float | None:
        """In-process seconds per round for the work Flower's rounds did: plus the clients'
        evaluation when the Flower run had federated evaluation rounds."""
        row = inproc.get(n, {})
        if row.get("per_round_s") is None:
            return None
        extra = row.get("client_eval_s_per_round", 0.0) if flower.get(n, {}).get("federated_evaluation") else 0.0
        return row["per_round_s"] + extra

    for n, row in inproc.items():
        row["per_round_same_work_s"] = baseline(n)
    overhead = ratio(flower.get(small, {}).get("per_round_s"), baseline(small))
    overhead_raw = ratio(flower.get(small, {}).get("per_round_s"), inproc.get(small, {}).get("per_round_s"))
    rss_ratio = None if small == large else ratio(flower.get(large, {}).get("peak_rss_mb"),
                                                  flower.get(small, {}).get("peak_rss_mb"))
    rows = []
    for engine, by_n in results.items():
        for n, row in by_n.items():
            agg = row.get("aggregate_s") or []
            rows.append({"engine": engine, "N": int(n), "total_s": row["total_s"], "startup_s": row["startup_s"],
                         "first_round_s": row["first_round_s"], "per_round_s": row["per_round_s"],
                         "per_round_per_client_ms": 1000 * row["per_round_s"] / int(n),
                         "same_work_s": row.get("per_round_same_work_s", row["per_round_s"]),
                         "cpu_s_per_round": row.get("cpu_s_per_round"),
                         "aggregate_s": sum(agg[1:]) / max(1, len(agg) - 1) if agg else None,
                         "peak_rss_mb": row["peak_rss_mb"], "peak_pss_mb": row.get("peak_pss_mb"),
                         "Score": row.get("summary", {}).get("Score")})
    rows.sort(key=lambda r: (r["N"], r["engine"]))
    print_table(rows, ["engine", "N", "total_s", "startup_s", "first_round_s", "per_round_s", "same_work_s",
                       "per_round_per_client_ms", "cpu_s_per_round", "aggregate_s", "peak_rss_mb", "peak_pss_mb", "Score"],
                f"Flower simulation vs in-process loop: {args.strategy}, {per_client} edit(s)/client, "
                f"{args.rounds} rounds, {args.threads} thread(s)/process")
    for n, row in flower.items():
        print(f"\nFlower N={n}: peak RSS by process (MiB) "
              + ", ".join(f"{k}={v:.0f}" for k, v in row["peak_rss_by_process_mb"].items())
              + f"; {row['client_actors']} ClientApp actor(s), actor threads {row['actor_thread_env']}")
        print(f"Flower N={n}: CPU s per round after round 1, by process: "
              + ", ".join(f"{k}={v:.2f}" for k, v in row["cpu_s_per_round_after_round_1_by_process"].items()))
    fed_eval = any(row.get("federated_evaluation") for row in flower.values())
    print(f"\nper-round time Flower / in-process at N={small}, same work: "
          + (f"{overhead:.2f} (target <= {TARGET_OVERHEAD})" if overhead is not None else "n/a")
          + (f"; against run_in_process alone: {overhead_raw:.2f} (Flower's rounds also ran a federated "
             "evaluation: every client evaluated its requests)" if fed_eval and overhead_raw else ""))
    print(f"Flower peak RSS at N={large} / N={small}: "
          + (f"{rss_ratio:.2f} (target <= {TARGET_RSS})" if rss_ratio is not None else "n/a"))

    from fedke.simulations.scenario import Scenario

    scenario = Scenario.from_run_config({**base, "edits-per-client": per_client})
    payload = {
        **results,
        "overhead_ratio_n10": overhead,
        "overhead_ratio_n10_vs_run_in_process_alone": overhead_raw,
        "rss_ratio_n100_over_n10": rss_ratio,
        "targets": {"overhead_ratio_max": TARGET_OVERHEAD, "rss_ratio_max": TARGET_RSS,
                    "overhead_met": overhead is not None and overhead <= TARGET_OVERHEAD,
                    "rss_met": rss_ratio is not None and rss_ratio <= TARGET_RSS},
        "config": {
            "clients": clients, "ratio_clients": [clients[0], clients[-1]], "rounds": args.rounds,
            "edits_per_client": per_client, "strategy": args.strategy, "preset": args.preset,
            "overrides": args.config or [], "federation_config": args.federation_config or [],
            "threads_per_process": args.threads, "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "world": {"subjects": scenario.world_subjects, "relations": scenario.world_relations,
                      "seed": scenario.world_seed, "model_layers": scenario.model_layers,
                      "model_width": scenario.model_width},
            "cache_dir": base.get("cache-dir") or os.environ.get("FEDKE_CACHE") or "~/.cache/fedke",
            "measured": {
                "per_round_s": "(end of round R - end of round 1) / (R - 1); a round = client edits + "
                               "server decode/merge + server oracle evaluation. Flower: the ServerApp's "
                               "'fit progress' elapsed; in-process: end of inprocess.evaluate_update",
                "overhead_ratio_n10": "Flower per_round_s / in-process per_round_same_work_s at the "
                                      "smallest N: when the Flower run had federated evaluation rounds "
                                      "(the ServerApp asks every client to evaluate its requests after "
                                      "each round), the in-process baseline adds the clients' own "
                                      "evaluation time (client_eval_s_per_round, measured in the child "
                                      "after run_in_process), so that both sides did the same work",
                "startup_s": "Flower: run_app call to the '[ROUND 1]' log line (approx., log arrives in "
                             "bursts); in-process: until the last client is built",
                "peak_rss_mb": "Flower: max over samples of the summed RSS of the run's processes; "
                               "in-process: ru_maxrss of the child process",
                "cpu_s_per_round": "CPU seconds per round after round 1: Flower, summed over the run's "
                                   "processes between the arrival of round 1's and round R's 'fit "
                                   "progress' lines (sampled); in-process, the child's process_time",
                "aggregate_s": "the strategy's own aggregate_seconds (decode + merge), mean over rounds 2..R",
            },
        },
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
