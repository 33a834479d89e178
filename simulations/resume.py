"""Resuming a checkpointed run: the policy (:func:`resume_point`), loading a checkpoint into a strategy
(:func:`restore`) and the Flower adapter that saves once per edit round (:class:`ResumableStrategy`).

Resume policy (:func:`resume_point`): with ``resume = false`` an existing checkpoint is never
overwritten (the run is refused: resume it or choose another directory); with ``resume = true``
the run continues after the last complete round, and is refused with a clear message when the
checkpoint belongs to a different config (the differing keys are named) or the run already
finished. A directory that holds checkpoint files (``state-*.safetensors``, ``metrics.jsonl``,
temp files of their writes) but no ``checkpoint.json`` is refused either way, naming what is
there and what is missing: never a silent restart from round 1 (a run that crashed before its
first round was committed leaves such files; delete them to start afresh). ``checkpoint-dir``,
``resume``, ``output-dir`` and ``cache-dir`` do not enter the fingerprint (where things are
written is not what is computed).

Both loops use it: :func:`fedke.simulations.multiround.run_multiround` (in process) and the
Flower ServerApp, through :class:`ResumableStrategy`, which shifts Flower's round numbers by the
rounds already done and saves once at the end of every round.

The checkpoint's files and their format: :mod:`fedke.simulations.checkpoint`.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.server.strategy import Strategy

from .checkpoint import (CHECKPOINT_JSON, Checkpoint, CheckpointError, _fingerprint_for_version, fingerprint_config,
                         load_checkpoint, restore_rng, save_checkpoint)
from .scenario import Scenario

__all__ = ["ResumableStrategy", "check_resumable", "restore", "resume_point"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- resume policy


def check_resumable(checkpoint: Checkpoint, scenario: Scenario) -> None:
    """CheckpointError unless ``scenario`` may continue ``checkpoint`` (same config, not finished)."""
    where = checkpoint.directory / CHECKPOINT_JSON
    if checkpoint.fingerprint != _fingerprint_for_version(scenario, checkpoint.version):
        current = fingerprint_config(scenario)
        differing = sorted(key for key in set(current) | set(checkpoint.config)
                           if current.get(key, "<absent>") != checkpoint.config.get(key, "<absent>"))
        details = ", ".join(f"{key.replace('_', '-')}: checkpoint {checkpoint.config.get(key, '<absent>')!r}, "
                            f"now {current.get(key, '<absent>')!r}" for key in differing)
        if not details and checkpoint.version == 2:  # it hashed the secret, whose value no message may show
            details = "conflict-secret differs (its value is not shown), or the fingerprint does"
        raise CheckpointError(f"refusing to resume {where}: it was written by a run with a different config "
                              f"({details or 'fingerprint differs'}). Resume with the same config, or use another "
                              "checkpoint-dir for a new run.")
    if checkpoint.finished or checkpoint.round >= scenario.num_rounds:
        raise CheckpointError(f"refusing to resume {where}: the run already finished (round {checkpoint.round} of "
                              f"{checkpoint.num_rounds}); there is nothing left to run. Its results are in the "
                              "checkpoint's metrics; start a new run in another checkpoint-dir.")


def resume_point(scenario: Scenario) -> Checkpoint | None:
    """The checkpoint to continue, under the policy of the module docstring; None to start afresh."""
    if not scenario.checkpoint_dir:
        return None
    checkpoint = load_checkpoint(scenario.checkpoint_dir)
    if checkpoint is None:
        if scenario.resume:
            log.info("no checkpoint in %s yet: starting the run from round 1", scenario.checkpoint_dir)
        return None
    if not scenario.resume:
        raise CheckpointError(f"{checkpoint.directory / CHECKPOINT_JSON} already holds a run (round {checkpoint.round} "
                              f"of {checkpoint.num_rounds}); set resume = true to continue it, or choose another "
                              "checkpoint-dir (it is never overwritten)")
    check_resumable(checkpoint, scenario)
    return checkpoint


def restore(checkpoint: Checkpoint, strategy: Any, writer: Any | None = None) -> int:
    """Load ``checkpoint`` into ``strategy`` (and the metrics into ``writer.rows``), restore the RNGs.

    Returns the round to continue from (the checkpoint's round + 1).
    """
    strategy.load_state_dict(checkpoint.strategy_state)
    if writer is not None:
        writer.rows = [dict(row) for row in checkpoint.rows]
    restore_rng(checkpoint.rng_arrays, checkpoint.rng_meta)
    log.info("resumed %s after round %d of %d", checkpoint.directory, checkpoint.round, checkpoint.num_rounds)
    return checkpoint.round + 1


# ----------------------------------------------------------------------------- Flower ServerApp


class ResumableStrategy(Strategy):
    """A fedke strategy that continues a checkpointed run under Flower's legacy server loop.

    Flower numbers a run's rounds from 1; after a resume the ServerApp runs only the rounds left
    (``ServerConfig(num_rounds = num-rounds - done)``) and this wrapper adds ``done`` to every
    round number it passes on, so clients edit the right round's requests and the results keep
    their true round.

    The checkpoint is saved once per round, after the round's last step that changes what is
    saved. Both of Flower's loops (``Server.fit`` and ``DefaultWorkflow``) run a round as fit,
    then the server's ``evaluate`` (the oracle metrics), then ``configure_evaluate``, and call
    ``aggregate_evaluate`` (the clients' federated metrics, recorded as ``federated`` rows) only
    when ``configure_evaluate`` selected clients. So the save happens in ``configure_evaluate``
    when it selects none, else in ``aggregate_evaluate``.

    Rounds here are EDIT rounds. A strategy of several Flower server rounds per edit round
    (``steps_per_round``, :class:`fedke.strategies.LayerwiseCollabEdit`: one per edited layer) is
    checkpointed at edit-round boundaries only (after the server round that ``ends_edit_round``),
    ``rounds_done`` counts edit rounds and Flower's rounds are shifted by ``rounds_done x
    steps_per_round``; a crash mid edit round resumes at that edit round's first step.
    """

    def __init__(self, inner: Any, scenario: Scenario, writer: Any, rounds_done: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.scenario = scenario
        self.writer = writer
        self.rounds_done = int(rounds_done)
        self._awaiting_evaluation: int | None = None  # the round whose save waits for aggregate_evaluate

    def __repr__(self) -> str:
        return f"ResumableStrategy({self.inner!r}, rounds_done={self.rounds_done})"

    @property
    def steps_per_round(self) -> int:
        return int(getattr(self.inner, "steps_per_round", 1))

    def _round(self, server_round: int) -> int:
        """Flower's ``server_round`` of this run as the inner strategy's server round (shifted)."""
        return server_round + self.rounds_done * self.steps_per_round if server_round > 0 else 0

    def _edit_round_ending(self, server_round: int) -> int | None:
        """The edit round that Flower's ``server_round`` completes, None if it completes none."""
        shifted = self._round(server_round)
        if server_round <= 0:
            return None
        ends = getattr(self.inner, "ends_edit_round", None)
        if ends is not None and not ends(shifted):
            return None
        edit_round = getattr(self.inner, "edit_round", None)
        return edit_round(shifted) if edit_round is not None else shifted

    def save(self, server_round: int) -> None:
        save_checkpoint(self.scenario.checkpoint_dir, self.scenario, self.inner, server_round,
                        self.writer.rows if self.writer is not None else [])

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(self._round(server_round), parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.inner.aggregate_fit(self._round(server_round), results, failures)

    def begin_round(self, server_round):
        """The inner strategy's reply-by-reply aggregation (:mod:`fedke.simulations.streaming`), round shifted."""
        return self.inner.begin_round(self._round(server_round))

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(self._round(server_round), parameters)

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = self.inner.configure_evaluate(self._round(server_round), parameters, client_manager)
        edit_round = self._edit_round_ending(server_round)
        if edit_round is not None:
            if instructions:  # Flower calls aggregate_evaluate next: save there, with the federated metrics
                self._awaiting_evaluation = edit_round
            else:  # no federated evaluation this round: the server's evaluate was the last step
                self._awaiting_evaluation = None
                self.save(edit_round)
        return instructions

    def aggregate_evaluate(self, server_round, results, failures):
        outcome = self.inner.aggregate_evaluate(self._round(server_round), results, failures)
        edit_round = self._edit_round_ending(server_round)
        if edit_round is not None and self._awaiting_evaluation == edit_round:
            self._awaiting_evaluation = None
            self.save(edit_round)
        return outcome
