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

import numpy as np
import torch
from torch import nn

from shoal.config import DataConfig
from shoal.data.datasets import Dataset, _split

NUM_FIELDS = 8
VOCAB = 50_000
ZIPF = 2.0


def hash_rows(field: np.ndarray, value: np.ndarray, rows: int) -> np.ndarray:
    """Row of feature ``(field, value)`` in a table of ``rows`` rows (splitmix64)."""
    x = (field.astype(np.uint64) << np.uint64(32)) ^ value.astype(np.uint64)
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return ((x ^ (x >> np.uint64(31))) % np.uint64(rows)).astype(np.int64)


def ctr(cfg: DataConfig) -> Dataset:
    """The dataset: int64 row ids [N, fields], float labels; see the module docstring."""
    from sklearn.metrics import log_loss, roc_auc_score  # (slow to import)

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
    test_prob = prob[test_idx.numpy()]
    labels = test[1].numpy()
    best = {"true_model_auc": float(roc_auc_score(labels, test_prob)),
            "true_model_logloss": float(log_loss(labels, test_prob, labels=[0, 1]))}  # fmt: skip

    def reference(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            scores = torch.sigmoid(model(test[0]).reshape(-1)).double().numpy()
        auc = float(roc_auc_score(labels, scores))
        return {"auc": auc, "logloss": float(log_loss(labels, scores, labels=[0, 1])), **best,
                "auc_gap": best["true_model_auc"] - auc}  # fmt: skip

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
