"""Training checkpoints: save, load (``weights_only=True``) and the compatibility check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
# Config keys that must match for a checkpoint to be loaded into a run.
IDENTITY_KEYS = ("method", "model.backbone", "model.num_experts", "model.classifier", "data.name")


class CheckpointMismatch(RuntimeError):
    """A checkpoint was written by a run with another method, class count or backbone."""


def identity(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the run loading it."""
    from omegaconf import OmegaConf

    ident: dict[str, Any] = {k: OmegaConf.select(cfg, k) for k in IDENTITY_KEYS}
    ident["num_classes"] = int(num_classes)
    return ident


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {where} was written by a different configuration ({'; '.join(diffs)}). "
            "Use another run.name, or remove that run directory to start over."
        )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    ident: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Model (incl. MoCo queues, which are buffers), optimizer and the next epoch.

    The LR schedule, the sampler and the random streams are pure functions of (seed, rank,
    epoch) — the loop reseeds at every epoch — so the epoch is their whole state, and a resumed
    run continues exactly. bf16 autocast needs no gradient scaler, so there is none to save.
    """
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,  # the next epoch to train
            "identity": ident,
            "extra": extra or {},
        },
        path,
    )
    return path


def load_checkpoint(directory: str | Path, ident: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load with ``weights_only=True``; refuse a checkpoint of another configuration."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in checkpoint directory {directory}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if ident is not None:
        check_identity(state.get("identity", {}), ident, str(directory))
    return state


def load_model_weights(model: nn.Module, directory: str | Path, ident: dict[str, Any] | None = None) -> int:
    """Load only the model weights of a checkpoint (evaluation, CBD teachers); returns its epoch."""
    state = load_checkpoint(directory, ident)
    unwrap(model).load_state_dict(state["model"])
    return int(state["epoch"])


def registered_checkpoint(run_path: str | Path) -> dict[str, Any]:
    """The latest checkpoint Ray Train registered for a local run directory (what a re-run resumes
    from): ``{"checkpoint_dir_name": ..., "metrics": {...}}`` from ``checkpoint_manager_snapshot.json``,
    or ``{}``. A worker's reports reach Ray's controller when it polls, so a newer ``checkpoint_*``
    directory may exist on disk that Ray has not registered."""
    snapshot = Path(run_path) / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return {}


def latest_checkpoint_dir(run_path: str | Path) -> Path:
    """The latest checkpoint of a local run directory: the one Ray Train registered last
    (``checkpoint_manager_snapshot.json``), else the newest ``checkpoint_*`` directory."""
    latest = registered_checkpoint(run_path).get("checkpoint_dir_name")
    if latest and (Path(run_path) / latest / CHECKPOINT_FILE).exists():
        return Path(run_path) / latest
    dirs = sorted(p for p in Path(run_path).glob("checkpoint_*") if (p / CHECKPOINT_FILE).exists())
    if not dirs:
        raise FileNotFoundError(f"no checkpoint with {CHECKPOINT_FILE} under run directory {run_path}")
    return dirs[-1]
