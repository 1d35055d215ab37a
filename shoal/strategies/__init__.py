"""The strategies: one plugin module each, and the table of built-in ones.

A job names its strategy in ``--strategy``: a key of :data:`BUILTIN`, or
``package.module:Plugin`` for a strategy of the user's own (a subclass or an
instance of :class:`Plugin`). :func:`resolve` finds the plugin and fills
``job.strategy.options`` with its section, read from ``[strategy.NAME]`` and
the flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shoal.config import JobConfig, check_component, flag_of, public_fields
from shoal.errors import UserError
from shoal.jobfile import overlay
from shoal.registry import import_ref, is_user_ref, lookup
from shoal.strategies import allreduce, easgd, fsdp, pipeline, tensor
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.federated import plugin as federated
from shoal.strategies.periodic import plugin as periodic
from shoal.strategies.plugin import NoOptions, Plugin
from shoal.strategies.ps import plugin as ps
from shoal.strategies.vertical import plugin as vertical

BUILTIN: dict[str, Plugin] = {
    p.name: p
    for p in (
        allreduce.Plugin(),
        ps.Plugin(),
        periodic.LocalSGDPlugin(),
        periodic.DiLoCoPlugin(),
        easgd.Plugin(),
        fsdp.Plugin(),
        tensor.Plugin(),
        pipeline.Plugin(),
        federated.Plugin(),
        vertical.Plugin(),
    )
}
"""The built-in strategies by name, in the order ``--help`` lists them."""

__all__ = [
    "BUILTIN",
    "Batch",
    "LossFn",
    "NoOptions",
    "Plugin",
    "Strategy",
    "check_job",
    "find_plugin",
    "resolve",
]


def find_plugin(name: str) -> Plugin:
    """The plugin ``--strategy name`` means; a :class:`UserError` if there is none."""
    if not is_user_ref(name):
        return lookup(name, BUILTIN, "strategy", "package.module:Plugin")
    module, _, attr = name.partition(":")
    found: Any = import_ref(name, "strategy")
    if isinstance(found, type) and issubclass(found, Plugin):
        found = found()
    if not isinstance(found, Plugin):
        raise UserError(
            f"strategy {name!r}: {attr} in {module} is no shoal.strategies.Plugin "
            "(see docs/STRATEGIES.md)"
        )
    for what in ("name", "runtime"):
        if not hasattr(found, what):
            raise UserError(f"strategy {name!r}: the plugin does not say its {what}")
    return found


def resolve(job: JobConfig) -> Plugin:
    """The job's plugin, with ``job.strategy.options`` set to its section: defaults, then
    ``[strategy.NAME]`` (or, in files older than sections, loose keys of ``[strategy]``),
    then the flags; ranges and choices checked."""
    s = job.strategy
    found = find_plugin(s.name)
    if isinstance(s.options, found.Config) and s.section == found.name:
        return found
    opts = found.Config()
    own = {flag_of(f): f.name for f in public_fields(opts)}
    for key, value in s.tables.items():
        if isinstance(value, dict):
            if key == found.name:
                overlay(opts, value, f"[strategy.{key}]")
            elif key not in BUILTIN:
                known = ", ".join(sorted({*BUILTIN, found.name}))
                raise UserError(f"unknown section [strategy.{key}]; strategies: {known}")
            continue
        flag = "--" + key.replace("_", "-")
        if flag in own:  # a file written before sections
            overlay(opts, {own[flag]: value}, "[strategy]")
        elif flag not in _builtin_flags():
            raise UserError(f"unknown key {key!r} in [strategy]")
    for field_name, value in s.given.items():
        if not hasattr(opts, field_name):
            flag = "--" + field_name.replace("_", "-")
            for f in _all_option_fields():
                if f.name == field_name:
                    flag = flag_of(f)
            users = [p.name for p in BUILTIN.values() if _has_field(p, field_name)]
            raise UserError(
                f"{flag} is an option of --strategy {', '.join(users)}, not {found.name}"
            )
        setattr(opts, field_name, value)
    check_component(opts)
    s.options, s.section, s.tables, s.given = opts, found.name, {}, {}
    return found


def check_job(plugin: Plugin, job: JobConfig) -> None:
    """Every check of ``job`` for ``plugin``: first the ones every job shares, which no
    plugin can skip (its section's ranges and choices; differential privacy, which a
    strategy that does not run it must refuse, never train without; ``--balance`` and
    ``--max-rank-batch``; ``--compress``), then the plugin's own (:meth:`Plugin.check`)."""
    options = plugin.options(job)
    check_component(options)
    _check_privacy(plugin, job)
    _check_balance(plugin, job)
    _check_recovery(plugin, job)
    if isinstance(getattr(options, "compress", None), str):
        from shoal.compress import check_codec

        check_codec(options.compress)
    plugin.check(job)


def _check_privacy(plugin: Plugin, job: JobConfig) -> None:
    """``--dp-*`` against what the strategy runs."""
    from shoal import privacy

    if not privacy.budget(job.train).enabled:
        return
    if job.data.audit_samples:
        raise UserError(
            "--audit-samples writes which samples each step drew, which differential "
            "privacy must keep secret: leave it out with --dp-clip"
        )
    if not plugin.privacy:
        who = ", ".join(f"{n} ({p.privacy}-level)" for n, p in BUILTIN.items() if p.privacy)
        raise UserError(
            f"--strategy {plugin.name} does not run differential privacy (--dp-*): use {who}"
        )


def _check_recovery(plugin: Plugin, job: JobConfig) -> None:
    """``--recovery`` and the settings of in-place recovery against what the job runs."""
    c = job.cluster
    if c.recovery == "restart" or "cluster.recovery" not in plugin.reads:
        return  # (a strategy that does not read --recovery refuses it: run.reads)
    mode, why = plugin.recovery(job)
    if mode == "inplace":
        return
    if c.recovery == "inplace":
        if why.startswith("--recovery"):
            raise UserError(why)
        raise UserError(
            f"--recovery inplace: --strategy {plugin.name} recovers only by restart: {why}"
        )
    given = [f for f, v in (("--spares", c.spares), ("--collective-timeout",
             job.strategy.collective_timeout)) if v]  # fmt: skip
    if given:
        raise UserError(f"{given[0]}: this job recovers a lost worker by restart ({why})")


def _check_balance(plugin: Plugin, job: JobConfig) -> None:
    """``--balance`` and ``--max-rank-batch`` against what the strategy runs."""
    from shoal import balance

    spec = balance.parse(job.train.balance)
    if spec.mode not in plugin.balance_modes:
        runs = " or ".join(plugin.balance_modes)
        who = ", ".join(n for n, p in BUILTIN.items() if spec.mode in p.balance_modes)
        raise UserError(
            f"--strategy {plugin.name} runs --balance {runs}, not {spec.mode} ({spec.mode}: {who})"
        )
    balance.check(spec, plugin.data_ranks(job))
    if job.train.max_rank_batch and not plugin.micro_batching:
        who = ", ".join(n for n, p in BUILTIN.items() if p.micro_batching)
        raise UserError(
            f"--strategy {plugin.name} does not cut slices by --max-rank-batch ({who} do)"
        )


def _has_field(p: Plugin, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(p.Config))


def _all_option_fields() -> list[dataclasses.Field]:
    return [f for p in BUILTIN.values() for f in dataclasses.fields(p.Config)]


def _builtin_flags() -> set[str]:
    return {flag_of(f) for f in _all_option_fields()}
