"""Flower apps, scenarios and result writers of fedke (``flwr run .`` and notebook sweeps).

* :mod:`fedke.simulations.server_app` / :mod:`~fedke.simulations.client_app`: the apps;
* :class:`~fedke.simulations.scenario.Scenario`: the run config, presets in ``presets/``;
* :class:`~fedke.simulations.client.EditClient`: the NumPyClient wrapping an editor;
* :func:`~fedke.simulations.inprocess.run_in_process`: the same clients and strategy in a plain
  loop, without Flower's runtime (for notebooks, benchmarks and tests).
"""
