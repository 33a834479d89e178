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

from fedke.codec import LayerSpec
from fedke.conflict import ConflictCoordinator
from fedke.strategies import make_strategy

from .results import ResultsWriter
from .runtime import evaluate_update, testbed_for
from .scenario import Scenario

log = logging.getLogger(__name__)


def build_strategy(scenario: Scenario, *, evaluate: bool = True, writer: ResultsWriter | None = None,
                   wait_for_clients: bool = True):
    """The strategy a scenario names, wired to the world model's layers and statistics."""
    bed = testbed_for(scenario, progress=True)
    editor = bed.editor(progress=True, **scenario.memit_overrides())  # progress: K0 of knowledge-weight, once
    specs = [LayerSpec(name, *shape) for name, shape in editor.layer_shapes().items()]
    n = scenario.effective_clients if wait_for_clients else 0
    kwargs = dict(layer_specs=specs, min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n,
                  fraction_evaluate=1.0 if wait_for_clients else 0.0, wire_dtype=scenario.wire_dtype,
                  max_edits_per_client=scenario.max_edits_per_client, **scenario.strategy_kwargs())
    if scenario.strategy_class_name == "collabedit":
        kwargs["regularisers"] = editor.regularisers()
    if scenario.conflict_detection != "off":
        kwargs["conflict_coordinator"] = ConflictCoordinator(scenario.conflict_policy,
                                                             priority=scenario.conflict_priority)
    if evaluate:
        kwargs["evaluate_fn"] = oracle_evaluate_fn(scenario, writer)
    if writer is not None:
        kwargs["on_round_end"] = lambda server_round, metrics: writer.record(server_round, metrics,
                                                                              request_set="merge")
        # the clients' own evaluation of their requests, combined weighted by their counts
        kwargs["on_evaluate_end"] = lambda server_round, metrics: _record_and_write(writer, server_round, metrics)
    if scenario.secure_aggregation:
        return _secagg_strategy(scenario, bed, specs, kwargs)
    if scenario.layerwise_enabled:
        return make_strategy("layerwise_collabedit", **kwargs)
    return make_strategy(scenario.strategy_class_name, **kwargs)


def _secagg_strategy(scenario: Scenario, bed, specs, kwargs):
    """CollabEdit over SecAgg+ with public bounds from the world model (:func:`fedke.strategies.secagg.default_bounds`)."""
    from fedke.editing.presets import get_module
    from fedke.editing.weights import weight_matrix
    from fedke.strategies.secagg import CollabEditSecAgg, default_bounds

    weights = {spec.name: weight_matrix(get_module(bed.model, spec.name)).detach().double().cpu().numpy()
               for spec in specs}
    bounds = default_bounds(kwargs["regularisers"], weights, lam=scenario.settings.memit.lam,
                            max_edits=scenario.max_edits_per_client, clip=scenario.secagg_clip)
    return CollabEditSecAgg(bounds=bounds, max_clients=scenario.num_clients, **kwargs)


def _record_and_write(writer: ResultsWriter, server_round: int, metrics) -> None:
    writer.record(server_round, metrics, request_set="federated")
    writer.write()


def oracle_evaluate_fn(scenario: Scenario, writer: ResultsWriter | None):
    """ORACLE: evaluate the global model on every request edited so far (all clients' requests)."""

    def evaluate(server_round: int, update):
        if server_round == 0:
            return None
        if scenario.forgetting:  # the old set every round, each new set at its round and the end
            from .multiround import OLD_SET, evaluate_round

            by_set = evaluate_round(scenario, update, server_round)
            metrics = by_set[OLD_SET]
        else:
            by_set = {"all": evaluate_update(scenario, update, server_round)}
            metrics = by_set["all"]
        log.info("round %d: %s", server_round, " ".join(f"{k}={v:.1f}" for k, v in metrics.items()))
        if writer is not None:
            for name, values in by_set.items():
                writer.record(server_round, values, request_set=name)
            writer.write()
            if server_round == scenario.num_rounds:
                writer.print_summary(f"fedke {scenario.strategy}: {scenario.effective_clients} client(s) x "
                                     f"{scenario.effective_edits_per_client} edits, {scenario.num_rounds} round(s)")
        return 1.0 - metrics.get("Score", 0.0) / 100.0, metrics

    return evaluate


def server_fn(context: Context) -> ServerAppComponents:
    scenario = Scenario.from_run_config(context.run_config)
    writer = ResultsWriter(scenario.output_dir, config=scenario.to_run_config(), method=scenario.strategy)
    if scenario.forgetting:
        writer.summary_set = "old"  # the old edits, whose forgetting the run measures
    strategy = build_strategy(scenario, writer=writer)
    steps = strategy.steps_per_round  # Flower server rounds per edit round (layer-wise: one per layer)
    num_rounds = scenario.num_rounds
    if scenario.checkpoint_dir:  # save after every edit round; resume = true continues the last complete one
        from .checkpoint import ResumableStrategy, restore, resume_point

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
    ``secure-aggregation = true``: the default workflow with ``SecAggPlusWorkflow`` as its fit stage."""
    components = server_fn(context)
    scenario = Scenario.from_run_config(context.run_config)
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
