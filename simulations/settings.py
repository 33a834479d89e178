"""The typed settings layer of the run configuration: one field per key, its default and the values it
accepts, each value checked as it is read (:class:`ConfigError` names the user's key and what it
accepts; nothing is coerced silently). :class:`fedke.simulations.scenario.Scenario` declares its
fields with :func:`setting`; the checks of combinations of keys are in
:mod:`fedke.simulations.capabilities`."""

from __future__ import annotations

import math
import re
from dataclasses import Field, field
from typing import Any

__all__ = ["ConfigError", "checked_value", "config_key", "setting"]


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


def checked_value(spec: Field, value: Any) -> Any:
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
