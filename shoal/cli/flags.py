"""Command-line flags derived from the config dataclasses.

Each field of each component of :class:`~shoal.config.JobConfig` becomes one
flag (``--field-name``, or ``metadata["flag"]``), grouped by component, with the
field's help text and default. Flags left out do not override the config file.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from shoal.config import JobConfig, flag_of, public_fields
from shoal.registry import is_user_ref
from shoal.run.resolve import Request
from shoal.strategies import BUILTIN, find_plugin


def add_job_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Add one argument group per config component to ``parser``, then one per strategy
    with options (a user's ``--strategy package.module:Plugin`` in ``argv`` included).
    An option several strategies share (``--compress``, ``--mesh``) is one flag."""
    defaults = JobConfig()
    for section in dataclasses.fields(JobConfig):
        component = getattr(defaults, section.name)
        doc = (type(component).__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(f"{section.name} ({doc.rstrip('.').lower()})")
        for f in public_fields(component):
            _add(group, f, getattr(component, f.name), f"{section.name}.{f.name}")
    plugins = list(BUILTIN.values())
    user = user_strategy(argv or [])
    if user is not None:
        plugins.append(find_plugin(user))
    owners: dict[str, list[str]] = {}
    for p in plugins:
        for f in dataclasses.fields(p.Config):
            owners.setdefault(flag_of(f), []).append(p.name)
    seen: set[str] = set()
    for p in plugins:
        fields = [f for f in dataclasses.fields(p.Config) if flag_of(f) not in seen]
        if not fields:
            continue
        group = parser.add_argument_group(f"--strategy {p.name} options ([strategy.{p.name}])")
        options = p.Config()
        for f in fields:
            seen.add(flag_of(f))
            users = owners[flag_of(f)]
            also = f"; {', '.join(users)}" if len(users) > 1 else ""
            _add(group, f, getattr(options, f.name), f"option.{f.name}", also)


def _add(group: Any, f: dataclasses.Field, default: Any, dest: str, also: str = "") -> None:
    kwargs: dict[str, Any] = {
        "dest": dest,
        "default": argparse.SUPPRESS,
        "help": f"{f.metadata['help']} (default: {default!r}{also})",
    }
    if f.name == "nnodes":  # torchrun's N or MIN:MAX
        kwargs["type"], kwargs["metavar"] = _nodes, "N|MIN:MAX"
    elif isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = type(default)
        kwargs["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
    group.add_argument(flag_of(f), **kwargs)


def user_strategy(argv: list[str]) -> str | None:
    """The ``package.module:Plugin`` that ``--strategy`` names in ``argv``, if any."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--strategy" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--strategy="):
            value = arg.partition("=")[2]
        if value and is_user_ref(value):
            return value
    return None


def request_of(args: argparse.Namespace) -> Request:
    """What ``shoal train``'s flags ask for: the job file, and each flag given by name."""
    given = {dest: value for dest, value in vars(args).items() if "." in dest}
    return Request(config=args.config, given=given, dry_run=getattr(args, "dry_run", False))


def _nodes(text: str) -> tuple[int, int]:
    """``N`` -> (0, N); ``MIN:MAX`` -> (MIN, MAX), as torchrun's ``--nnodes`` reads it."""
    low, _, high = text.partition(":")
    try:
        return (int(low), int(high)) if high else (0, int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN:MAX") from None
