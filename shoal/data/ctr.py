"""Synthetic click-through data with a known true model.

Each sample has ``num_fields`` categorical features; field ``f`` takes value
``v`` with Zipf (power-law) frequency over a vocabulary of ``vocab`` values, so
a few values are very common and most are rare, as in real click logs. Feature
``(f, v)`` is hashed into one table of ``table_rows`` rows. The true model is
logistic regression on those rows: ``P(click) = sigmoid(b + sum_f w[row_f])``
with fixed true weights, so the best achievable AUC and log-loss on the test
split are known exactly (the true probabilities' own scores), and reported
beside the trained model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.config import DataConfig
from shoal.data.datasets import Dataset, _split
from shoal.data.order import splitmix64
from shoal.registry import reads

NUM_FIELDS = 8
VOCAB = 50_000
ZIPF = 2.0


def hash_rows(field: np.ndarray, value: np.ndarray, rows: int) -> np.ndarray:
    """Row of feature ``(field, value)`` in a table of ``rows`` rows (splitmix64)."""
    x = (field.astype(np.uint64) << np.uint64(32)) ^ value.astype(np.uint64)
    return (splitmix64(x) % np.uint64(rows)).astype(np.int64)


@reads("num_samples", "table_rows", "test_fraction", "data_seed")
def ctr(cfg: DataConfig) -> Dataset:
    """The dataset: int64 row ids [N, fields], float labels; see the module docstring."""
    rng = np.random.default_rng(cfg.data_seed)
    n, rows = cfg.num_samples, cfg.table_rows
    values = np.minimum(rng.zipf(ZIPF, size=(n, NUM_FIELDS)), VOCAB) - 1
    fields = np.broadcast_to(np.arange(NUM_FIELDS), values.shape)
    ids = hash_rows(fields, values, rows)
    # true weights per (field, value), looked up through the same hash
    true_w = rng.normal(0.0, 0.6, size=(NUM_FIELDS, VOCAB)).astype(np.float32)
    bias = np.float32(-1.0)
    logits = bias + true_w[fields, values].sum(1)
    prob = 1 / (1 + np.exp(-logits))
    clicks = (rng.random(n) < prob).astype(np.float32)
    index = torch.arange(n)
    (train_idx, _), test_split = _split(index, index, cfg.test_fraction, cfg.data_seed)
    test_idx = test_split[0] if test_split is not None else index
    x, y = torch.from_numpy(ids), torch.from_numpy(clicks)
    train, test = (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
    reference = auc_reference(test[0], test[1].numpy(), prob[test_idx.numpy()])

    return Dataset(
        name="ctr",
        task="binary",
        train=train,
        test=test,
        num_outputs=1,
        input_shape=(NUM_FIELDS,),
        reference=reference,
        info={"table_rows": rows, "num_fields": NUM_FIELDS},
    )


# --- on disk: `shoal data make ctr`, read through --data parquet:DIR ----------------------

CAT_FIELDS = 26
DENSE_FIELDS = 13
DISK_VOCAB = (3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 100_000, 30_000,
              10_000) * 2  # fmt: skip
"""Values of each categorical field, from a handful to 100k: about 570k (field, value)
pairs in all, most of them rare, hashed into a table of a million rows or more."""
HEAD = 5
"""Value ``floor(vocab * u**HEAD)`` for uniform ``u``: a heavy head and a long tail.
Measured in one process (Adagrad, one epoch, a table of 2M rows): with fields of up
to 300k values and ``u**3``, 20M rows left a model 0.016 AUC short of the true one
(0.024 in a 1M-row table); this layout is 0.014 short at 20M rows and 0.009 at 40M."""
BUCKETS = 64
"""Dense features become categorical: the bucket of 4*log1p(x), at most this many."""
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes to floats in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _hash(*parts: np.ndarray | int) -> np.ndarray:
    x = np.zeros(np.broadcast_shapes(*(np.shape(p) for p in parts)), dtype=np.uint64)
    for p in parts:
        x = splitmix64(x ^ np.asarray(p).astype(np.int64).astype(np.uint64))
    return x


def ctr_columns(seed: int, start: int, count: int, split: int) -> dict[str, np.ndarray]:
    """Rows ``[start, start+count)`` of a split (0 train, 1 test) of the on-disk CTR data.

    Row ``i`` depends only on ``(seed, split, i)``, so any range can be made alone, in
    bounded memory. Categorical ``C1..C26`` hold 63-bit hashes of (field, value) with
    Zipf-like value frequencies; dense ``I1..I13`` are counts (log-normal). The true
    model is ``logit = -1.5 + sum w(C_f) + sum a_d (log1p(I_d) - 1)`` with weights fixed
    by the seed; ``true_prob`` is kept for the test split so AUC has a reference."""
    rows = np.arange(start, start + count, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    logit = np.full(count, -1.5)
    for f in range(CAT_FIELDS):
        u = _unit(_hash(seed, split, f, rows))
        vocab = DISK_VOCAB[f]
        value = np.floor(vocab * u**HEAD).astype(np.int64)
        raw = (_hash(seed, 1_000 + f, value) >> np.uint64(1)).astype(np.int64)
        out[f"C{f + 1}"] = raw
        logit += (_unit(_hash(seed, 2_000, raw)) - 0.5) * 1.6
    for d in range(DENSE_FIELDS):
        z = _normal(_hash(seed, split, 100 + d, rows))
        x = np.floor(np.expm1(np.maximum(0.0, 1.0 + 1.2 * z))).astype(np.float32)
        out[f"I{d + 1}"] = x
        a = (float(_unit(_hash(seed, 3_000, d))[()]) - 0.5) * 1.0
        logit += a * (np.log1p(x) - 1.0)
    prob = 1.0 / (1.0 + np.exp(-logit))
    click = _unit(_hash(seed, split, 999, rows)) < prob
    out = {"label": click.astype(np.float32), **out}
    if split == 1:
        out["true_prob"] = prob.astype(np.float64)
    return out


def _normal(h: np.ndarray) -> np.ndarray:
    """Standard normal from hashes (Box-Muller on two halves)."""
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 1.0) / 4294967297.0
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) / 4294967296.0
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


CTR_META = {
    "generator": "ctr",
    "features": [f"C{f + 1}" for f in range(CAT_FIELDS)]
    + [f"I{d + 1}" for d in range(DENSE_FIELDS)],
    "label": "label",
    "task": "binary",
    "num_outputs": 1,
    "transform": "ctr",
    "reference_column": "true_prob",
}


def ctr_transform(table_rows: int) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """The built-in transform of on-disk CTR rows: int64 ids ``[n, 39]`` for
    :class:`~shoal.models.sparse.LogisticCTR`. A categorical value is already a hash of
    (field, value), so its row is the value modulo ``table_rows``; a dense count is
    bucketed (``4*log1p``) and its (field, bucket) row looked up in a table made once."""
    fields = np.repeat(np.arange(CAT_FIELDS, CAT_FIELDS + DENSE_FIELDS), BUCKETS)
    buckets = np.tile(np.arange(BUCKETS), DENSE_FIELDS)
    dense_rows = hash_rows(fields, buckets, table_rows).reshape(DENSE_FIELDS, BUCKETS)
    rows = np.uint64(table_rows)

    def transform(table: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.empty((table.num_rows, CAT_FIELDS + DENSE_FIELDS), dtype=np.int64)
        for f in range(CAT_FIELDS):
            raw = table.column(f"C{f + 1}").to_numpy()
            ids[:, f] = raw.view(np.uint64) % rows
        for d in range(DENSE_FIELDS):
            x = table.column(f"I{d + 1}").to_numpy()
            bucket = np.minimum(np.floor(4 * np.log1p(np.maximum(x, 0))), BUCKETS - 1)
            ids[:, CAT_FIELDS + d] = dense_rows[d, bucket.astype(np.int64)]
        y = table.column("label").to_numpy().astype(np.float32)
        return torch.from_numpy(ids), torch.from_numpy(y)

    return transform


def auc_reference(
    x: torch.Tensor, labels: np.ndarray, true_prob: np.ndarray
) -> Callable[[nn.Module], dict[str, float]]:
    """Metrics of a trained CTR model on held-out ``x``, beside the true model's."""
    from sklearn.metrics import log_loss, roc_auc_score  # (slow to import)

    best = {"true_model_auc": float(roc_auc_score(labels, true_prob)),
            "true_model_logloss": float(log_loss(labels, true_prob, labels=[0, 1]))}  # fmt: skip

    def reference(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            scores = torch.sigmoid(model(x).reshape(-1)).double().numpy()
        auc = float(roc_auc_score(labels, scores))
        return {"auc": auc, "logloss": float(log_loss(labels, scores, labels=[0, 1])), **best,
                "auc_gap": best["true_model_auc"] - auc}  # fmt: skip

    return reference
