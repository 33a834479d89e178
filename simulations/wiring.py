"""Wiring: the strategy a scenario names, with the model's layer specs, regularisers and hooks.

The one place that turns a :class:`~fedke.simulations.scenario.Scenario` into a Flower strategy;
the ServerApp, the in-process drivers (:mod:`~fedke.simulations.inprocess`,
:mod:`~fedke.simulations.multiround`, :mod:`~fedke.simulations.secure`) and the benchmarks import
it downward.
"""

from __future__ import annotations

from fedke.codec import LayerSpec
from fedke.conflict import ConflictCoordinator
from fedke.strategies import make_strategy

from .oracle import oracle_evaluate_fn
from .results import ResultsWriter
from .runtime import testbed_for
from .scenario import Scenario


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
