"""Loss and evaluation per task type, shared by every model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shoal.data import Dataset


def per_sample_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of every sample (no reduction): squared error or cross-entropy."""
    if task == "regression":
        return (output.reshape(target.shape) - target).pow(2)
    if task == "classification":
        return F.cross_entropy(output, target, reduction="none")
    if task == "language-model":  # mean over the sequence's tokens
        return (
            F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none")
            .view(target.shape)
            .mean(1)
        )
    if task == "binary":
        return F.binary_cross_entropy_with_logits(
            output.reshape(target.shape), target, reduction="none"
        )
    raise ValueError(f"unknown task {task!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: torch.device, batch: int = 4096
) -> dict[str, float]:
    """Metrics of ``model`` on the held-out split, plus the dataset's own reference."""
    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    if data.test is not None:
        x, y = data.test
        total, correct = 0.0, 0
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
            out = model(xb)
            total += per_sample_loss(data.task, out, yb).sum().item()
            if data.task in ("classification", "language-model"):
                correct += int((out.argmax(-1) == yb).sum())
            elif data.task == "binary":
                correct += int(((out.reshape(yb.shape) > 0).float() == yb).sum())
        metrics["test_loss"] = total / len(x)
        if data.task in ("classification", "binary"):
            metrics["test_accuracy"] = correct / len(x)
        if data.task == "language-model":  # per token
            metrics["test_accuracy"] = correct / y.numel()
            metrics["test_perplexity"] = math.exp(metrics["test_loss"])
    if data.reference is not None:
        metrics.update(data.reference(model))
    model.train(was_training)
    return metrics
