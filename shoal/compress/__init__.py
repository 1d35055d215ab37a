"""Gradient compression: codecs with exact byte accounting and error feedback."""

from __future__ import annotations

from shoal.compress.codecs import (
    COMPRESS_HELP,
    QSGD,
    Codec,
    HalfPrecision,
    NoCompression,
    Payload,
    PowerSGD,
    Quantize,
    Sign,
    TopK,
    check_codec,
    parse_codec,
)

__all__ = [
    "COMPRESS_HELP",
    "QSGD",
    "Codec",
    "HalfPrecision",
    "NoCompression",
    "Payload",
    "PowerSGD",
    "Quantize",
    "Sign",
    "TopK",
    "check_codec",
    "parse_codec",
]
