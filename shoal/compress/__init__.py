"""Gradient compression: codecs with exact byte accounting and error feedback."""

from __future__ import annotations

from shoal.compress.codecs import (
    QSGD,
    Codec,
    HalfPrecision,
    NoCompression,
    Payload,
    PowerSGD,
    Sign,
    TopK,
    parse_codec,
)

__all__ = [
    "QSGD",
    "Codec",
    "HalfPrecision",
    "NoCompression",
    "Payload",
    "PowerSGD",
    "Sign",
    "TopK",
    "parse_codec",
]
