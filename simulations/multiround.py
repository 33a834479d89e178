"""Multi-round collaborative editing in process: knowledge forgetting, dynamic covariance, resume.

A forgetting scenario (``forgetting = true``, :mod:`fedke.simulations.scenario`) follows the
CollabEdit paper (section 3.3.2, Table 5): Flower round 1 (the paper's round 0) edits the old
requests E_o, spread over the clients; every later round ``i + 1`` edits fresh requests E_n_i,
unrelated to the old ones (other subjects and relations); the server merges every round.

What is measured after every round, on the global model (an ORACLE that sees every client's
requests, which only a simulation can have), as tidy long rows ``round, method, request_set,
metric, value`` (:class:`fedke.simulations.results.ResultsWriter`):

* ``old``: E_o, after EVERY round (forgetting is its decay);
* ``new-<i>``: E_n_i, at the round that edits it and again at the final round (evaluating every
  new set after every round would cost ``O(rounds^2)``);
* ``new-all``: every new request together, at the final round;
* ``merge``: the server's merge metrics of the round (timings, norms, counts).

All of a round's sets are scored in one batched evaluation. A scenario without ``forgetting``
gets the single set ``all`` (every request edited so far), as the ServerApp's oracle records it.

Rounds are edit rounds: with layer-wise CollabEdit (``layerwise``) each is the strategy's L server
rounds, one per edited layer (:func:`fedke.simulations.inprocess.run_edit_round`), and checkpoints
are written at edit-round boundaries.

Long runs: nothing grows with the rounds but the metrics rows (a few dozen small dicts per round)
and the strategy's per-round metrics dicts; payloads are dropped after each merge and no model is
ever copied (clients apply the cumulative update to the one shared model and restore it bit for
bit). Every round logs a progress line; with ``checkpoint-dir`` the server state is saved after
every round (:mod:`fedke.simulations.checkpoint`) and ``resume = true`` continues it.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .checkpoint import save_checkpoint
from .client_app import make_client
from .inprocess import LocalProxy, run_edit_round
from .oracle import OLD_SET, evaluate_round
from .results import ResultsWriter
from .resume import restore, resume_point
from .scenario import Scenario
from .wiring import build_strategy

log = logging.getLogger(__name__)

def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: ``VmHWM`` of ``/proc/self/status``
    (``ru_maxrss`` elsewhere; on Linux it also carries a parent's peak over ``exec``)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class MultiRoundOutcome:
    """What :func:`run_multiround` returns."""

    scenario: Scenario
    writer: ResultsWriter
    strategy: Any
    first_round: int  # 1, or the round a resumed run continued from
    seconds_per_round: list[float] = field(default_factory=list)  # of the rounds run in this call

    def table(self):
        """The tidy long table (``round, method, request_set, metric, value``) plus ``covariance``."""
        frame = self.writer.table()
        frame["covariance"] = self.scenario.covariance
        return frame


RoundCallback = Callable[[int, dict[str, dict[str, float]], float], None]


def run_multiround(scenario: Scenario, *, output_dir: str | None = None, write: bool = True,
                   on_round: RoundCallback | None = None, stop_after: int | None = None) -> MultiRoundOutcome:
    """Run ``scenario`` round by round in this process, measuring the request sets after every round.

    ``on_round(server_round, metrics_by_set, seconds)`` is called after every round (benchmarks
    read RSS there). ``stop_after`` ends the call after that round, as a crash would (the
    checkpoint, if any, is complete; the results files are not written).
    With ``checkpoint-dir`` the state is saved after every round; with ``resume = true`` the run
    continues from the last complete round (see :func:`fedke.simulations.resume.resume_point`
    for what is refused).
    """
    writer = ResultsWriter(output_dir or scenario.output_dir, config=scenario.to_run_config(),
                           method=scenario.strategy)
    writer.summary_set = OLD_SET if scenario.forgetting else "all"
    strategy = build_strategy(scenario, evaluate=False, writer=writer, wait_for_clients=False)
    checkpoint = resume_point(scenario)
    first = restore(checkpoint, strategy, writer) if checkpoint is not None else 1
    clients = [make_client(scenario, cid) for cid in range(scenario.effective_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    outcome = MultiRoundOutcome(scenario, writer, strategy, first)
    for server_round in range(first, scenario.num_rounds + 1):  # edit rounds (layer-wise: L server rounds each)
        started = time.perf_counter()
        run_edit_round(strategy, clients, proxies, server_round)
        merged = time.perf_counter()
        metrics = evaluate_round(scenario, strategy.global_update, server_round)
        for name, values in metrics.items():
            writer.record(server_round, values, request_set=name)
        if scenario.checkpoint_dir:
            save_checkpoint(scenario.checkpoint_dir, scenario, strategy, server_round, writer.rows)
        seconds = time.perf_counter() - started
        outcome.seconds_per_round.append(seconds)
        key = OLD_SET if OLD_SET in metrics else "all"
        shown = metrics.get(key, {})
        log.info("round %d/%d: %.2f s (edit+merge %.2f s), %s Score %.1f AccScore %.1f, RSS %.0f MiB",
                 server_round, scenario.num_rounds, seconds, merged - started, key,
                 shown.get("Score", float("nan")), shown.get("AccScore", float("nan")), current_rss_mb())
        if on_round is not None:
            on_round(server_round, metrics, seconds)
        if stop_after is not None and server_round >= stop_after:
            return outcome
    if write:
        writer.write()
    return outcome
