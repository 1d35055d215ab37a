"""Which settings a job reads, from what their owners declare, so that a value the job
would ignore is refused instead (or, set by a job file, named in a warning).

A setting is read by every job unless its field says otherwise (see
:func:`shoal.config.option`): ``reader="model"``, ``"data"`` or ``"strategy"`` make it
read only by the models, datasets or strategies that declare it
(:attr:`shoal.models.ModelSpec.reads`, ``@reads`` on a dataset,
:attr:`shoal.strategies.Plugin.reads`); ``when`` makes it read only in one mode
(``--staleness`` with ``--ps-mode ssp``). A strategy's own options follow the same
``when`` rule; an option of another strategy is refused when the strategy is resolved.
A model or dataset of the user's own may read any of its section's settings.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

from shoal.config import JobConfig, flag_of, public_fields
from shoal.data import DATASETS, data_reads
from shoal.data.disk import open_disk
from shoal.errors import UserError
from shoal.models import MODELS, model_reads
from shoal.strategies import BUILTIN, Plugin


def _fields(comp: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in public_fields(comp)}


def _owner(job: JobConfig, plugin: Plugin, section: str, f: dataclasses.Field) -> str:
    """Why the job's model, dataset or strategy does not read ``f`` (empty: it does)."""
    if section in plugin.ignores or f"{section}.{f.name}" in plugin.ignores:
        return f"--strategy {plugin.name} does not read it ({plugin.ignores_why})"
    reader = f.metadata.get("reader")
    if reader == "model":
        read = model_reads(job.model.name)
        if read is None or f.name in read:
            return ""
        who = [n for n, spec in MODELS.items() if f.name in spec.reads]
        return f"--model {job.model.name} does not read it (" + _readers("--model", who) + ")"
    if reader == "data":
        read = data_reads(job.data.name)
        if read is None or f.name in read:
            return ""
        who = [n for n, fn in DATASETS.items() if f.name in fn.reads]
        if f.name in open_disk.reads:
            who.append("parquet:PATH")
        return f"--data {job.data.name} does not read it (" + _readers("--data", who) + ")"
    if reader == "strategy":
        if f"{section}.{f.name}" in plugin.reads:
            return ""
        who = [n for n, p in BUILTIN.items() if f"{section}.{f.name}" in p.reads]
        return f"--strategy {plugin.name} does not read it (" + _readers("--strategy", who) + ")"
    return ""


def owner_reads(job: JobConfig, section: str, name: str) -> bool:
    """Whether the job's model, dataset or strategy reads ``section.name`` (its mode
    aside): what :func:`shoal.rundir.check_resume` lets change."""
    from shoal.strategies import resolve

    comp = getattr(job, section)
    f = _fields(comp).get(name)
    return f is None or not _owner(job, resolve(job), section, f)


def _readers(flag: str, who: list[str]) -> str:
    return f"read with {flag} {', '.join(who)}" if who else "read by none of the built-ins"


def _mode(comp: Any, job: JobConfig, f: dataclasses.Field) -> str:
    """Why ``f`` does not matter in the job's mode (empty: it does)."""
    when = f.metadata.get("when")
    if not when:
        return ""
    name, op, values = when, "", ""
    for sep in ("!=", "="):
        if sep in when:
            name, op, values = when.partition(sep)[0], sep, when.partition(sep)[2]
            break
    section, _, field_name = name.rpartition(".")
    owner = getattr(job, section) if section else comp
    setting = _fields(owner)[field_name]
    value = getattr(owner, field_name)
    flag = flag_of(setting)
    if not op:
        return "" if value else f"it is read only with {flag} set (this job: {value!r})"
    allowed = values.split("|")
    shown = value if isinstance(value, str) else repr(value)
    matches = str(value) in allowed or (
        isinstance(value, (int, float)) and any(_num(v) == value for v in allowed)
    )
    if op == "=" and not matches:
        return f"it is read only with {flag} {' or '.join(allowed)} (this job: {shown})"
    if op == "!=" and matches:
        return f"it is not read with {flag} {shown}"
    return ""


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def unread(job: JobConfig, plugin: Plugin, keys: Iterable[str]) -> dict[str, str]:
    """Of ``keys`` (``section.field``, ``option.field`` for the strategy's own), those the
    job does not read, each with its flag and why: ``{key: "--hidden: --model linear does
    not read it (...)"}``."""
    found: dict[str, str] = {}
    options = job.strategy.options
    for key in keys:
        section, _, name = key.partition(".")
        if section == "option" or (section == "strategy" and "." in name):
            comp, name = options, name.rpartition(".")[2]
        elif section in {f.name for f in dataclasses.fields(JobConfig)}:
            comp = getattr(job, section)
        else:
            continue
        f = _fields(comp).get(name) if comp is not None else None
        if f is None:
            continue
        why = _owner(job, plugin, section, f) or _mode(comp, job, f)
        if why:
            found[key] = f"{flag_of(f)}: {why}"
    return found


def check_reads(
    job: JobConfig, plugin: Plugin, given: Iterable[str], from_file: Iterable[str], source: str
) -> None:
    """Refuse a value given by name that ``job`` does not read (one line); warn, in one
    line each, about one a job file sets (to other than its default) that it ignores.
    ``from_file``: ``section.field``, and ``strategy.NAME.field`` for ``[strategy.NAME]``."""
    refused = unread(job, plugin, given)
    if refused:
        raise UserError(next(iter(refused.values())) + "; leave it out")
    where = f" in {source}" if source else ""
    defaults = JobConfig()
    changed, others = [], set()
    for key in from_file:
        section, _, name = key.partition(".")
        if section == "strategy" and "." in name:
            table, _, field_name = name.partition(".")
            if table != job.strategy.section:
                others.add(table)
            elif getattr(job.strategy.options, field_name, None) != getattr(
                type(job.strategy.options)(), field_name, None
            ):
                changed.append(key)
        elif getattr(getattr(job, section, None), name, None) != getattr(
            getattr(defaults, section, None), name, None
        ):
            changed.append(key)
    for table in sorted(others):
        print(f"shoal: warning: [strategy.{table}]{where} is for --strategy {table}, and this "
              f"job runs {job.strategy.name}; ignored", file=sys.stderr)  # fmt: skip
    for why in unread(job, plugin, changed).values():
        print(f"shoal: warning: {why}{where}; ignored", file=sys.stderr)
