"""Editing settings per model, kept as data files (as MEMIT and EasyEdit keep their hparams).

A settings file (``fedke/editing/hparams/<model>.json``) holds what must be tuned per model:

.. code-block:: json

    {"model": "smollm2", "description": "...", "chosen_by": "bench/hparams_sweep.py ...",
     "memit": {"layers": [4, 5, 6, 7, 8], "fact_token": "subject_last", "lam": 3000.0, ...},
     "covariance": {"text": "stdlib", "tokens": 20000}}

``memit`` holds :class:`~fedke.editing.MemitConfig` fields (``layers: null`` = the model family's
default); ``covariance`` names the text of ``C`` (MEMIT's ``mom2_dataset`` / ``mom2_n_samples``:
``"stdlib"``, ``"model"``, ``"world"`` or a path; see :mod:`fedke.data.corpus`) and its size in tokens.
:meth:`EditingSettings.load` and :meth:`EditingSettings.save` are each other's inverse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fedke.cache import atomic_write_json
from fedke.editing.memit import MemitConfig

BUILTIN = ("smollm2", "world", "real-default")
_MEMIT_FIELDS = {f.name for f in fields(MemitConfig)}


@dataclass(frozen=True)
class EditingSettings:
    """One model's editing settings: MEMIT's hyper-parameters and the covariance text."""

    model: str
    memit: MemitConfig
    covariance_text: str = "stdlib"
    covariance_tokens: int = 20000
    description: str = ""
    chosen_by: str = ""
    source: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> "EditingSettings":
        where = f"settings file {source}" if source else "settings"
        if not isinstance(data, dict) or not isinstance(data.get("memit"), dict):
            raise ValueError(f"{where}: expected an object with a 'memit' object")
        unknown = sorted(set(data["memit"]) - _MEMIT_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown MEMIT setting(s) {unknown}; known: {sorted(_MEMIT_FIELDS)}")
        memit = dict(data["memit"])
        for key in ("layers", "context_templates"):
            if memit.get(key) is not None:
                memit[key] = tuple(memit[key])
        try:
            config = MemitConfig(**memit)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        covariance = data.get("covariance", {})
        return cls(model=str(data.get("model", "")), memit=config,
                   covariance_text=str(covariance.get("text", "stdlib")),
                   covariance_tokens=int(covariance.get("tokens", 20000)),
                   description=str(data.get("description", "")), chosen_by=str(data.get("chosen_by", "")),
                   source=source)

    def to_dict(self) -> dict[str, Any]:
        defaults = MemitConfig()
        memit = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.memit).items()
                 if v != getattr(defaults, k) or k in ("layers", "fact_token", "lam")}
        return {"model": self.model, "description": self.description, "chosen_by": self.chosen_by,
                "memit": memit, "covariance": {"text": self.covariance_text, "tokens": self.covariance_tokens}}

    @classmethod
    def load(cls, name_or_path: str | Path) -> "EditingSettings":
        """A built-in model's settings by name (:data:`BUILTIN`), or a settings file by path."""
        name = str(name_or_path)
        if name in BUILTIN:
            text = resources.files("fedke.editing").joinpath("hparams", f"{name}.json").read_text()
            return cls.from_dict(json.loads(text), source=f"fedke/editing/hparams/{name}.json")
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"no editing settings {name!r}: give one of {list(BUILTIN)} or a settings JSON file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"settings file {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def with_memit(self, **overrides: Any) -> "EditingSettings":
        return replace(self, memit=replace(self.memit, **overrides))
