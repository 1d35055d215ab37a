"""Built-in datasets: in-memory tensors with a train and a test split.

Every dataset is generated or loaded identically on every rank from
``data_seed``, so workers never need to exchange data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from shoal.config import DataConfig
from shoal.registry import reads

Split = tuple[torch.Tensor, torch.Tensor]


class Rows(Protocol):
    """The training samples, by row number: tensors in memory or files on disk."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> Split:
        """(features, labels) of ``rows``, in that order."""
        ...


class TensorRows:
    """Rows of tensors in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def take(self, rows: np.ndarray) -> Split:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.x.device)
        return self.x[index], self.y[index]

    def to(self, device: torch.device) -> TensorRows:
        return TensorRows(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    """The samples of one workload plus what the trainer needs to know about them.

    ``train`` is a pair of tensors, or :class:`Rows` read on demand (a dataset on
    disk); ``test`` is a pair of tensors.

    ``task`` picks the loss and the evaluation metrics: ``"regression"`` (squared
    error), ``"classification"`` (cross-entropy, accuracy) or ``"binary"``
    (logistic loss on one logit, accuracy). ``reference`` may
    compute extra metrics for a trained model (for instance the distance to the
    closed-form least-squares solution).
    """

    name: str
    task: str
    train: Split | Rows
    test: Split | None
    num_outputs: int
    input_shape: tuple[int, ...]
    reference: Callable[[nn.Module], dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> Rows:
        """The training samples as :class:`Rows`."""
        if isinstance(self.train, tuple):
            return TensorRows(*self.train)
        return self.train

    @property
    def num_train(self) -> int:
        return len(self.rows)

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))


def _split(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[Split, Split | None]:
    if fraction <= 0:
        return (x, y), None
    perm = np.random.default_rng([seed, 7]).permutation(len(x))
    num_test = max(1, round(len(x) * fraction))
    test, train = perm[:num_test], perm[num_test:]
    return (x[train], y[train]), (x[test], y[test])


@reads("num_samples", "num_features", "noise", "test_fraction", "data_seed")
def synthetic_linear(cfg: DataConfig) -> Dataset:
    """y = X w + b + noise, with known ``w``, ``b`` and noise level.

    ``reference`` compares a trained ``nn.Linear`` with numpy's least-squares
    solution on the same training data, the best any training can do.
    """
    rng = np.random.default_rng(cfg.data_seed)
    n, d = cfg.num_samples, cfg.num_features
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    b = np.float32(rng.standard_normal())
    y = x @ w + b + cfg.noise * rng.standard_normal(n).astype(np.float32)
    train, test = _split(torch.from_numpy(x), torch.from_numpy(y), cfg.test_fraction, cfg.data_seed)

    xt = train[0].double().numpy()
    design = np.hstack([xt, np.ones((len(xt), 1))])
    solution, *_ = np.linalg.lstsq(design, train[1].double().numpy(), rcond=None)

    def reference(model: nn.Module) -> dict[str, float]:
        linear = _only_linear(model)
        if linear is None:
            return {}
        got = np.concatenate(
            [
                linear.weight.detach().double().cpu().numpy().ravel(),
                linear.bias.detach().double().cpu().numpy().ravel(),
            ]
        )
        true = np.concatenate([w, [b]]).astype(np.float64)
        return {
            "lstsq_rel_error": float(np.linalg.norm(got - solution) / np.linalg.norm(solution)),
            "true_weights_rel_error": float(np.linalg.norm(got - true) / np.linalg.norm(true)),
        }

    return Dataset(
        name="synthetic-linear",
        task="regression",
        train=train,
        test=test,
        num_outputs=1,
        input_shape=(d,),
        reference=reference,
        info={"noise": cfg.noise},
    )


def _only_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) == 1 and linears[0].out_features == 1 and linears[0].bias is not None:
        return linears[0]
    return None


@reads("test_fraction", "data_seed")
def digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    data, target = _digits_arrays()
    x = torch.tensor(data / 16.0, dtype=torch.float32)
    y = torch.tensor(target, dtype=torch.long)
    train, test = _split(x, y, cfg.test_fraction, cfg.data_seed)
    return Dataset(
        name="digits",
        task="classification",
        train=train,
        test=test,
        num_outputs=10,
        input_shape=(1, 8, 8),
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """What ``sklearn.datasets.load_digits`` returns as ``data`` and ``target``, read from
    the file it reads, in scikit-learn's package: importing scikit-learn takes a second
    of CPU, more than the rest of a small job's start-up (where the file is not there,
    scikit-learn loads it)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(roots)), "datasets", "data", "digits.csv.gz") if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


BUILTIN: dict[str, Callable[[DataConfig], Dataset]] = {
    "synthetic-linear": synthetic_linear,
    "digits": digits,
}
"""Datasets defined here; ``shoal.data.DATASETS`` adds the click-through one."""


# --- on disk: `shoal data make linear` ----------------------------------------------------


def linear_truth(seed: int, features: int) -> tuple[np.ndarray, float]:
    """The true weights and bias of ``shoal data make linear``."""
    rng = np.random.default_rng([seed, 77])
    return rng.standard_normal(features), float(rng.standard_normal())


def linear_columns(seed: int, chunk: int, count: int, split: int, features: int,
                   noise: float) -> dict[str, np.ndarray]:  # fmt: skip
    """Chunk ``chunk`` (``count`` rows) of ``y = x.w + b + noise`` with x standard normal:
    one fixed-size list column ``x`` and a ``label``."""
    w, b = linear_truth(seed, features)
    rng = np.random.default_rng([seed, split, chunk])
    x = rng.standard_normal((count, features), dtype=np.float32)
    y = x @ w.astype(np.float32) + np.float32(b) + noise * rng.standard_normal(count, np.float32)
    return {"x": x, "label": y.astype(np.float32)}


def linear_reference(meta: dict[str, Any]) -> Callable[[nn.Module], dict[str, float]] | None:
    """The distance of a trained ``nn.Linear`` to the true weights a generator stored."""
    if "true_weights" not in meta:
        return None
    true = np.asarray([*meta["true_weights"], meta["true_bias"]], dtype=np.float64)

    def reference(model: nn.Module) -> dict[str, float]:
        linear = _only_linear(model)
        if linear is None or linear.in_features + 1 != len(true):
            return {}
        got = np.concatenate([linear.weight.detach().double().cpu().numpy().ravel(),
                              linear.bias.detach().double().cpu().numpy().ravel()])  # fmt: skip
        return {"true_weights_rel_error": float(np.linalg.norm(got - true) / np.linalg.norm(true))}

    return reference
