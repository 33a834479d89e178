"""``flwr run .``'s ServerApp: a fedke strategy over the scenario in the run config.

The server loads the world model (training and caching it on first use, before any client
needs it) and its covariance statistics: CollabEdit merges with ``lam * C``. After every round
it evaluates the global model on every request edited so far (an ORACLE only a simulation can
have) and rewrites the results table in ``output-dir``.

With layer-wise CollabEdit (``layerwise``, :mod:`fedke.strategies.layerwise`) an edit round is L
Flower server rounds (one per edited layer): the server runs ``num-rounds x L`` of them, and the
results, the oracle and the checkpoints are numbered by edit round.
"""

from __future__ import annotations

import logging

from flwr.common import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from .results import ResultsWriter
from .scenario import Scenario
from .wiring import build_strategy

log = logging.getLogger(__name__)


def server_fn(context: Context) -> ServerAppComponents:
    scenario = Scenario.from_run_config(context.run_config)
    writer = ResultsWriter(scenario.output_dir, config=scenario.to_run_config(), method=scenario.strategy)
    if scenario.forgetting:
        writer.summary_set = "old"  # the old edits, whose forgetting the run measures
    strategy = build_strategy(scenario, writer=writer)
    steps = strategy.steps_per_round  # Flower server rounds per edit round (layer-wise: one per layer)
    num_rounds = scenario.num_rounds
    if scenario.checkpoint_dir:  # save after every edit round; resume = true continues the last complete one
        from .resume import ResumableStrategy, restore, resume_point

        checkpoint = resume_point(scenario)
        done = restore(checkpoint, strategy, writer) - 1 if checkpoint is not None else 0
        strategy = ResumableStrategy(strategy, scenario, writer, rounds_done=done)
        num_rounds -= done
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=num_rounds * steps))


app = ServerApp()


def _find_secagg(strategy):
    """The CollabEditSecAgg inside ``strategy`` (it may be wrapped, e.g. by the checkpointing wrapper)."""
    from fedke.strategies.secagg import CollabEditSecAgg

    while strategy is not None and not isinstance(strategy, CollabEditSecAgg):
        strategy = getattr(strategy, "inner", None)
    return strategy


@app.main()
def main(grid, context: Context) -> None:
    """Plain runs: exactly what ``ServerApp(server_fn=server_fn)`` does (the legacy server loop).
    ``streaming-aggregation = true``: the same loop with a streaming fit stage that merges each reply
    as it arrives (:class:`fedke.simulations.streaming.StreamingServer`; server memory independent of
    the number of clients).
    ``secure-aggregation = true``: the default workflow with ``SecAggPlusWorkflow`` as its fit stage.
    ``flower-api = "message"``: the same strategy under Flower's Message API
    (:class:`fedke.strategies.message.MessageEditStrategy`), started with ``strategy.start``."""
    components = server_fn(context)
    scenario = Scenario.from_run_config(context.run_config)
    if scenario.flower_api == "message":
        from fedke.strategies.message import MessageEditStrategy

        strategy = MessageEditStrategy(components.strategy)
        strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=components.config.num_rounds,
                       timeout=components.config.round_timeout or 3600, evaluate_fn=strategy.oracle)
        return
    if not scenario.secure_aggregation:
        from flwr.server.compat import start_grid

        server = components.server
        if scenario.streaming_aggregation:
            from flwr.server import SimpleClientManager

            from .streaming import StreamingServer

            server = StreamingServer(client_manager=components.client_manager or SimpleClientManager(),
                                     strategy=components.strategy)
        start_grid(server=server, config=components.config, strategy=None if server is not None else components.strategy,
                   client_manager=components.client_manager, grid=grid)
        return
    from flwr.server import LegacyContext
    from flwr.server.workflow import DefaultWorkflow

    legacy = LegacyContext(context, config=components.config, strategy=components.strategy)
    DefaultWorkflow(fit_workflow=_find_secagg(components.strategy).workflow())(grid, legacy)
