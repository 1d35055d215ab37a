"""Name -> factory tables for models, datasets and strategies, plus user code.

A name is either a key of the table or ``package.module:function``, which is
imported and called instead; both fail with a :class:`UserError` naming what
was asked for and what exists.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from shoal.errors import UserError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def is_user_ref(name: str) -> bool:
    """True for ``package.module:function`` references to user code."""
    return ":" in name


def import_ref(ref: str, kind: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (from the working directory too, as the
    workers do) and return the function. The working directory is searched last: a
    module there named like one of the standard library or an installed package
    (``json.py``, ``torch/``) does not replace it, so name your own modules apart."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UserError(f"{kind} {ref!r} must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # so that `shoal` finds what the workers find; appended, not put first: first,
        # any file in the directory a command runs in would shadow what shoal imports
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {kind} module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{kind} {ref!r}: {module_name} has no callable {attr!r}")
    return fn


def lookup(name: str, table: Mapping[str, T], kind: str, ref: str = "package.module:function") -> T:
    """Return ``table[name]`` or raise a :class:`UserError` listing the choices (and the
    ``ref`` form that names user code)."""
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UserError(f"unknown {kind} {name!r}; built-in: {known} (or {ref})") from None


def reads(*names: str) -> Callable[[F], F]:
    """Declare the config fields a built-in function reads (``fn.reads``), beside it:
    ``@reads("num_samples", "noise")``."""

    def mark(fn: F) -> F:
        fn.reads = names  # type: ignore[attr-defined]
        return fn

    return mark
