"""Which run-config keys combine: every check of a combination of keys, in one place.

:func:`check_scenario` runs when a :class:`fedke.simulations.scenario.Scenario` is built (after
each key's own value was checked, :mod:`fedke.simulations.settings`) and raises
:class:`ConfigError` naming the keys that do not combine and why. :func:`layerwise_conflicts`
says what keeps a scenario from running layer-wise CollabEdit (``layerwise = "auto"`` falls back
to the one-shot merge there; ``"true"`` is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .settings import ConfigError

__all__ = ["check_scenario", "layerwise_conflicts"]


def check_scenario(s: Any) -> None:
    """Every combination check of scenario ``s``, in a fixed order (the first refusal is raised)."""
    _check_model(s)
    _check_editor(s)
    _check_multiround(s)
    _check_overlap_conflict(s)
    _check_layerwise(s)
    _check_passes(s)
    if s.secure_aggregation and (s.strategy != "collabedit" or s.num_clients < 2):
        raise ConfigError("secure-aggregation = true needs strategy collabedit with at least 2 clients "
                          f"(SecAgg+ sums; got strategy {s.strategy!r}, {s.num_clients} client(s))")
    if s.secure_aggregation and s.conflict_detection != "off":
        raise ConfigError("secure-aggregation = true cannot run conflict detection (it needs per-client replies)")
    if s.secure_aggregation and s.streaming_aggregation:
        raise ConfigError("secure-aggregation = true cannot use streaming-aggregation = true "
                          "(SecAgg+ has its own fit stage)")
    _check_flower_api(s)
    capacity = s.world_subjects * s.world_relations
    if s.is_world and s.total_edits > capacity:
        raise ConfigError(f"the scenario edits {s.total_edits} facts but the world has only {capacity} "
                          "(subject, relation) pairs: raise world-subjects or lower the edits")


def _check_multiround(s: Any) -> None:
    """The forgetting / covariance / checkpoint keys (see :mod:`fedke.simulations.scenario`)."""
    if s.covariance == "dynamic" and s.strategy_class_name != "collabedit":
        raise ConfigError(f"covariance = 'dynamic' needs strategy collabedit or global, got {s.strategy!r}: "
                          "the baselines merge the clients' deltas, which were solved with C0")
    if s.resume and not s.checkpoint_dir:
        raise ConfigError("resume = true needs checkpoint-dir (where the run's checkpoint is)")
    if not s.forgetting or not s.is_world:  # a fact set's sizes are checked when dealing
        return
    if not 1 <= s.old_relations < s.world_relations:
        raise ConfigError(f"old-relations must be in 1..world-relations - 1 ({s.world_relations - 1}), "
                          f"got {s.old_relations}: the new requests need relations of their own")
    per_round = s.num_clients * s.edits_per_client
    if per_round > s.world_subjects * s.old_relations:
        raise ConfigError(f"the old set has {per_round} requests but old-relations={s.old_relations} "
                          f"x world-subjects={s.world_subjects} allow only {s.world_subjects * s.old_relations}")
    new_capacity = (s.world_subjects - per_round) * (s.world_relations - s.old_relations)
    if per_round * (s.num_rounds - 1) > new_capacity:
        raise ConfigError(f"{s.num_rounds - 1} new rounds of {per_round} requests need "
                          f"{per_round * (s.num_rounds - 1)} (subject, relation) pairs unrelated to the old set; "
                          f"the world guarantees only {new_capacity}: raise world-subjects or lower the edits")

def _check_model(s: Any) -> None:
    """The model / dataset / settings keys (see the scenario module's docstring)."""
    from fedke.models import PACKAGED_MODELS

    if s.model != "world" and s.model not in PACKAGED_MODELS:
        raise ConfigError(f"model must be 'world' or a packaged model ({', '.join(PACKAGED_MODELS)}), got "
                          f"{s.model!r}; a model of your own goes in model-path (a Hugging Face model "
                          "directory, a .whl or a .gguf file)")
    if s.model_path and s.is_world:
        raise ConfigError("model-path loads a real model: leave model = 'world' out of it (model = 'smollm2')")
    if s.model_path and not Path(s.model_path).expanduser().exists():
        raise ConfigError(f"model-path {s.model_path!r} does not exist (a Hugging Face model directory, "
                          "a .whl or a .gguf file)")
    if s.is_world and s.dataset:
        raise ConfigError("dataset needs a real model (model = 'smollm2' or a path): the world model "
                          "knows only its own synthetic world")
    if s.dataset and not Path(s.dataset).is_file():
        raise ConfigError(f"dataset {s.dataset!r} is not a file (a CounterFact or zsRE JSON list)")
    if s.hparams or not s.is_world:
        s.settings  # noqa: B018 -- reads the settings file now, so a bad one fails here

def _check_editor(s: Any) -> None:
    """The ``editor`` key: AlphaEdit protects knowledge by its projection, not knowledge-weight."""
    if s.editor == "alphaedit" and s.knowledge_weight > 0:
        raise ConfigError("editor = 'alphaedit' does not combine with knowledge-weight > 0 (AlphaEdit protects "
                          "known facts by projecting keys onto C0's null space instead)")

def _check_overlap_conflict(s: Any) -> None:
    """The residual-guard and conflict keys (see :mod:`fedke.simulations.scenario`)."""
    if not 0 <= s.conflict_pairs <= s.num_clients * s.edits_per_client:
        raise ConfigError(f"conflict-pairs must be in 0..num-clients x edits-per-client "
                          f"({s.num_clients * s.edits_per_client}), got {s.conflict_pairs}")

def layerwise_conflicts(s: Any) -> list[str]:
    """What keeps this scenario from running layer-wise CollabEdit (empty when it can)."""
    reasons = []
    if s.strategy_class_name != "collabedit":
        reasons.append(f"strategy {s.strategy!r} (layer-wise is CollabEdit / Global-Edit only)")
    if s.secure_aggregation:
        reasons.append("secure-aggregation = true")
    if s.residual_guard > 0:
        reasons.append(f"residual-guard = {s.residual_guard}")
    if s.conflict_detection != "off":
        reasons.append(f"conflict-detection = {s.conflict_detection!r}")
    return reasons

def _check_flower_api(s: Any) -> None:
    """The ``flower-api`` key: what runs on the legacy path only (see :mod:`fedke.simulations.scenario`)."""
    if s.flower_api != "message":
        return
    legacy_only = [(s.secure_aggregation, "secure-aggregation = true (Flower 1.42 offers SecAgg+ through the "
                                             "legacy workflow only)"),
                   (s.conflict_detection != "off", f"conflict-detection = {s.conflict_detection!r} (its "
                                                      "claims are text, which a MetricRecord cannot carry)"),
                   (s.streaming_aggregation, "streaming-aggregation = true (Flower's Message-API loop "
                                                "collects every reply before aggregate_train)"),
                   (bool(s.checkpoint_dir), "checkpoint-dir (checkpoints hook into the legacy loop)")]
    reasons = [reason for on, reason in legacy_only if on]
    if reasons:
        raise ConfigError(f"flower-api = 'message' does not combine with {'; '.join(reasons)}: "
                          "use flower-api = 'legacy' for these")

def _check_layerwise(s: Any) -> None:
    """The ``layerwise`` key (see :mod:`fedke.simulations.scenario`)."""
    if s.layerwise != "true":
        return
    reasons = layerwise_conflicts(s)
    if s.editor_mode != "sequential":
        reasons.insert(0, f"editor-mode = {s.editor_mode!r} (layer-wise is for sequential MEMIT; "
                          "one-shot CollabEdit of decoupled payloads is already exact)")
    if reasons:
        raise ConfigError(f"layerwise = 'true' does not combine with {'; '.join(reasons)}")

def _check_passes(s: Any) -> None:
    """The ``passes`` key (see :mod:`fedke.simulations.scenario`)."""
    if s.passes > 1 and s.strategy_class_name == "collabedit" and not s.layerwise_enabled:
        raise ConfigError(f"passes = {s.passes} with strategy {s.strategy!r} needs the layer-wise protocol "
                          "(editor-mode = 'sequential', layerwise = 'auto' or 'true'): one-shot merging equals "
                          "Global-Edit for one pass only, since each pass must see every client's earlier passes")
