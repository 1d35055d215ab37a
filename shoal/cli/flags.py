"""Command-line flags derived from the config dataclasses.

Each field of each component of :class:`~shoal.config.JobConfig` becomes one
flag (``--field-name``, or ``metadata["flag"]``), grouped by component, with the
field's help text and default. Flags left out do not override the config file.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from shoal.config import JobConfig


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """Add one argument group per config component to ``parser``."""
    defaults = JobConfig()
    for section in dataclasses.fields(JobConfig):
        component = getattr(defaults, section.name)
        doc = (type(component).__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(f"{section.name} ({doc.rstrip('.').lower()})")
        for f in dataclasses.fields(component):
            default = getattr(component, f.name)
            kwargs: dict[str, Any] = {
                "dest": f"{section.name}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata['help']} (default: {default!r})",
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
            group.add_argument(_flag(f), **kwargs)


def apply_flags(ns: argparse.Namespace, job: JobConfig) -> JobConfig:
    """Overwrite ``job`` with every flag the user actually gave."""
    for dest, value in vars(ns).items():
        section, _, name = dest.partition(".")
        if dest == "cluster.nnodes":
            job.cluster.min_nodes, job.cluster.nnodes = value
        elif name and hasattr(job, section):
            setattr(getattr(job, section), name, value)
    return job


def _nodes(text: str) -> tuple[int, int]:
    """``N`` -> (0, N); ``MIN:MAX`` -> (MIN, MAX), as torchrun's ``--nnodes`` reads it."""
    low, _, high = text.partition(":")
    try:
        return (int(low), int(high)) if high else (0, int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN:MAX") from None


def given(ns: argparse.Namespace, section: str, name: str) -> bool:
    """Whether the user gave the flag for ``section.name``."""
    return f"{section}.{name}" in vars(ns)
