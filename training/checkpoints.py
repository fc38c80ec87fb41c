"""One training checkpoint directory: weights (safetensors), optimizer and scheduler state
(tensors and numbers only, read back with ``weights_only=True``), ``state.json`` (epoch,
best score, history, the images the scan found unreadable), and the best epoch's weights when
they are not the current ones (a run checkpoints at intervals, not after every epoch, so the
best epoch may have none of its own). Nothing here is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIM_FILE = "optim.pt"
STATE_FILE = "state.json"


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights (safetensors), optimizer+scheduler (tensors and numbers only), state, and
    ``best``: the best epoch's weights when they differ from the model's."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    if best is not None:
        save_file(best, directory / BEST_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / OPTIM_FILE,
    )
    (directory / STATE_FILE).write_text(json.dumps(state))


def load_checkpoint_state(directory: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    return state


def load_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (safetensors: no code runs on load)."""
    return load_file(directory / MODEL_FILE)


def load_best_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The best epoch's weights of a checkpoint: its own file, or the model's when the
    checkpoint's epoch was the best."""
    path = directory / BEST_FILE
    return load_file(path if path.exists() else directory / MODEL_FILE)


def load_optimizer_state(directory: Path, optimizer: Any, scheduler: Any) -> None:
    """Restore the optimizer and scheduler of a checkpoint (``weights_only``: no pickle)."""
    saved = torch.load(directory / OPTIM_FILE, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])


__all__ = [
    "load_best_weights",
    "load_checkpoint_state",
    "load_checkpoint_weights",
    "load_optimizer_state",
    "save_checkpoint",
]
