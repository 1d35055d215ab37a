"""Job files: a :class:`~shoal.config.JobConfig` from TOML (one table per component,
``[strategy.NAME]`` for a strategy's own options) and back, every key and type checked
in one line."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import tomli_w

from shoal.config import JobConfig, public_fields
from shoal.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def from_dict(data: dict[str, Any], base: JobConfig | None = None, source: str = "") -> JobConfig:
    """Overlay a ``{section: {field: value}}`` mapping on ``base`` (default values).

    ``[strategy.NAME]`` tables, and keys of ``[strategy]`` that are no common field
    (files written before strategies had sections), are kept as read in
    ``job.strategy.tables``: only the chosen strategy's plugin knows their fields."""
    job = base or JobConfig()
    where = f" in {source}" if source else ""
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    for sname, values in data.items():
        if sname not in sections:
            raise UserError(f"unknown section [{sname}]{where}; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise UserError(f"[{sname}]{where} must be a table")
        comp = getattr(job, sname)
        if sname == "strategy":
            common = {f.name for f in public_fields(comp)}
            rest = {k: v for k, v in values.items() if k not in common}
            values = {k: v for k, v in values.items() if k in common}
            if rest:
                comp.options = None  # resolved again, with these
                comp.tables.update(rest)
        overlay(comp, values, f"[{sname}]", where)
        if sname == "strategy" and "name" in values:
            comp.options = None
    return job


def overlay(comp: Any, values: dict[str, Any], table: str, where: str = "") -> None:
    """Set ``comp``'s fields from ``values``; a key it lacks or a value of the wrong type
    is a :class:`UserError` that names the ``table`` (and ``where`` it was read)."""
    fields = {f.name: f for f in public_fields(comp)}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"unknown key {key!r} in {table}{where}; known: {known}")
        setattr(comp, key, _coerce(value, fields[key], f"{table} {key}{where}"))


def _coerce(value: Any, f: dataclasses.Field, what: str) -> Any:
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind):
        return value
    elif kind is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a column list
    raise UserError(f"{what} must be a {kind.__name__}, got {value!r}")


def load_toml(path: str | os.PathLike, base: JobConfig | None = None) -> JobConfig:
    """Read a job file; unreadable or invalid files raise :class:`UserError`."""
    return from_dict(read_toml(path), base, source=str(path))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A job file's tables as read (:class:`UserError` if it cannot be read)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None
    return data


def dumps_toml(job: JobConfig) -> str:
    return tomli_w.dumps(job.to_dict())


def loads_toml(text: str) -> JobConfig:
    """The job in ``text``, as :func:`dumps_toml` wrote it."""
    return from_dict(tomllib.loads(text))
