"""Text for the language-model workload, shipped with shoal (no download).

The corpus is the reference topics of the Python 3.11 documentation (the text
``pydoc`` shows; see ``corpus/NOTICE.md``): 466 thousand characters of English
prose and code. Tokens are characters. The held-out split is the *end* of the
text, so evaluation is on passages the model never saw, not on neighbours of
training windows.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.config import DataConfig
from shoal.data.datasets import Dataset
from shoal.errors import UserError
from shoal.registry import reads

CORPUS = Path(__file__).parent / "corpus" / "python-reference.txt.gz"


def read_corpus() -> str:
    """The shipped text, as one string."""
    with gzip.open(CORPUS, "rb") as f:
        return f.read().decode("utf-8")


def _windows(ids: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: ``x`` the tokens, ``y`` each one's successor."""
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab: int) -> float:
    """Perplexity on ``test`` of the character frequencies of ``train`` (add-one
    smoothed): what a model that ignores context achieves."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(math.exp(-log_p[test].mean()))


@reads("context", "test_fraction")
def text(cfg: DataConfig) -> Dataset:
    """Character-level next-token prediction on the shipped corpus, in windows of
    ``cfg.context`` tokens; the last ``cfg.test_fraction`` of the text is held out."""
    if cfg.context < 2:
        raise UserError(f"--context must be at least 2, got {cfg.context}")
    raw = read_corpus()
    codes = np.frombuffer(raw.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)
    ids = np.searchsorted(vocab, codes).astype(np.int32)
    cut = len(ids) - max(cfg.context + 1, round(len(ids) * cfg.test_fraction))
    if cut < cfg.context + 1:
        raise UserError(f"--context {cfg.context} leaves no training text")
    train_ids, test_ids = ids[:cut], ids[cut:]
    baseline = unigram_perplexity(train_ids, test_ids, len(vocab))

    def reference(model: nn.Module) -> dict[str, float]:
        return {"unigram_perplexity": baseline}

    return Dataset(
        name="text",
        task="language-model",
        train=_windows(train_ids, cfg.context),
        test=_windows(test_ids, cfg.context),
        num_outputs=len(vocab),
        input_shape=(cfg.context,),
        reference=reference,
        info={
            "vocab": "".join(chr(c) for c in vocab),
            "context": cfg.context,
            "characters": len(ids),
        },
    )


# --- on disk: `shoal data make text` ------------------------------------------------------


def text_columns(
    context: int, start: int, count: int, split: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Windows ``[start, start+count)`` of the shipped text, tokenized by character: row
    ``i`` is ``context`` tokens from offset ``(i * context) mod`` the split's length, and
    their successors. The last 10% of the text is the test split."""
    ids, vocab = _encoded()
    cut = len(ids) - len(ids) // 10
    part = ids[:cut] if split == 0 else ids[cut:]
    span = len(part) - context - 1
    starts = (np.arange(start, start + count, dtype=np.int64) * context) % span
    grid = starts[:, None] + np.arange(context + 1)
    windows = part[grid].astype(np.int16)
    meta = {"num_outputs": len(vocab), "vocab": "".join(chr(c) for c in vocab),
            "distinct_rows": span // context}  # fmt: skip
    return {"tokens": windows[:, :-1], "next": windows[:, 1:]}, meta


def _encoded() -> tuple[np.ndarray, np.ndarray]:
    codes = np.frombuffer(read_corpus().encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)
    return np.searchsorted(vocab, codes).astype(np.int32), vocab
