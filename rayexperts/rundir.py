"""The run directory (docs/results.md), local path or URI: one object for everything that reads or writes it.

``RunDir.of(storage_path, name)`` is ``<storage_path>/<name>`` (a config's: ``RunDir.for_config(cfg)``): its
``config.yaml``, its Parquet tables, the checkpoint Ray Train registered last, and the check that a run directory
holds a run of the same configuration before it is resumed or reused. Paths may be local or any URI pyarrow
understands (``s3://``, ``gs://``), like Ray Train's ``storage_path``. Every file is written to a
temporary name and moved into place, so a reader never sees half a file. Checkpoints are loaded
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from rayexperts.config import absolute_path_or_uri, from_dict, is_uri, result_settings
from rayexperts.errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from omegaconf import DictConfig
    from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
# Config keys that must match for a run directory (and its checkpoints) to be resumed or reused.
IDENTITY_KEYS = ("method", "model.backbone", "model.num_experts", "model.classifier", "data.name")


class CheckpointMismatch(InputError, RuntimeError):
    """A run directory or checkpoint belongs to a run of another configuration."""


class StorageError(InputError, OSError):
    """The storage a run writes to cannot be written; the message names the key and the location."""


class ScheduleChanged(CheckpointMismatch):
    """A run directory with checkpoints was trained with another schedule than the one asked for now."""


# What a checkpointed run's schedule is: changing any of them on resume is refused unless run.allow_extend=true
# (each is a key that can change a result: rayexperts.config.is_result_key).
SCHEDULE_KEYS = ("train.epochs", "train.batch_size", "train.lr", "train.momentum", "train.nesterov",
                 "train.weight_decay", "train.schedule", "train.milestones", "train.gamma", "train.warmup_epochs",
                 "train.warmup_start", "train.lr_step", "train.lr_epoch_clock", "train.cosine_t_max", "train.eta_min",
                 "train.mixup_alpha", "train.optimizer", "train.backbone_lr_scale")
FAILED_MARK = "FAILED"  # a run that failed before its first evaluation: analysis.load_runs skips the directory


def identity(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the run loading it."""
    from omegaconf import OmegaConf

    ident: dict[str, Any] = {k: OmegaConf.select(cfg, k) for k in IDENTITY_KEYS}
    ident["num_classes"] = int(num_classes)
    weights = OmegaConf.select(cfg, "model.weights")
    if weights and Path(str(weights)).expanduser().is_file():  # the pretrained weights a run needs, by content
        import hashlib

        with open(Path(str(weights)).expanduser(), "rb") as f:
            ident["model.weights_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return ident


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {where} was written by a different configuration ({'; '.join(diffs)}). "
            "Use another run.name, or remove that run directory to start over."
        )


# ------------------------------------------------------------------------------ checkpoint files


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def _left_out(model: nn.Module) -> set[str]:
    """The state-dict keys of parameters a fine-tuning mode froze in a pretrained model (``frozen_by_finetune``
    of each ``MultiExpertNet`` inside ``model``): the weights file has them, so checkpoints leave them out."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        out |= {f"{prefix}.{n}" if prefix else n for n in getattr(module, "frozen_by_finetune", ())}
    return out


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of ``model``: its state dict, without the frozen pretrained parameters of a
    fine-tuning run (the trainable part and every buffer, BatchNorm statistics included; docs/pretrained.md)."""
    model = unwrap(model)
    skip = _left_out(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a checkpoint's model state (:func:`model_state`) into a model built from the same config (its frozen
    pretrained parameters loaded from ``model.weights``); anything else missing or unexpected is an error."""
    model = unwrap(model)
    skip = _left_out(model)
    if not skip:
        model.load_state_dict(state)
        return
    missing = [k for k in model.state_dict() if k not in state and k not in skip]
    unexpected = [k for k in state if k not in model.state_dict()]
    if missing or unexpected:
        model.load_state_dict(state)  # raises, naming them
    model.load_state_dict(state, strict=False)


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    ident: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Model (incl. MoCo queues, which are buffers), optimizer and the next epoch.

    The LR schedule, the sampler and the random streams are pure functions of (seed, rank,
    epoch) — the loop reseeds at every epoch — so the epoch is their whole state, and a resumed
    run continues exactly. bf16 autocast needs no gradient scaler, so there is none to save.
    """
    import torch

    path = Path(directory) / CHECKPOINT_FILE
    state = {"model": model_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "identity": ident, "extra": extra or {}}
    torch.save(state, path)
    return path


def load_checkpoint(directory: str | Path, ident: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a local checkpoint directory with ``weights_only=True``; refuse one of another configuration."""
    import torch

    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in checkpoint directory {directory}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if ident is not None:
        check_identity(state.get("identity", {}), ident, str(directory))
    return state


# ------------------------------------------------------------------------------ the directory


class RunDir:
    """One run directory ``uri`` (an absolute local path or a URI). Nothing is created until written."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None) -> None:
        self.uri = absolute_path_or_uri(str(uri)).rstrip("/")
        if fs is not None:  # a file system given (children share their parent's)
            self.fs, self.path = fs, self.uri.split("://", 1)[-1] if is_uri(self.uri) else self.uri
        elif is_uri(self.uri):
            self.fs, self.path = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), self.uri

    @classmethod
    def of(cls, storage_path: str, name: str) -> RunDir:
        return cls(f"{absolute_path_or_uri(str(storage_path)).rstrip('/')}/{name}")

    @classmethod
    def for_config(cls, cfg: DictConfig) -> RunDir:
        """``cfg``'s run (or job, or sweep) directory: ``run.storage_path/run.name``."""
        return cls.of(str(cfg.run.storage_path), str(cfg.run.name))

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> RunDir:
        return RunDir(f"{self.uri}/{name}", self.fs)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    # -- files -----------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self._file(name) if name else self.path).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self.fs.get_file_info(self._file(name)).type == pafs.FileType.File

    def create(self) -> RunDir:
        self.fs.create_dir(self.path, recursive=True)
        return self

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (a temporary file moved into place)."""
        self.create()
        tmp = self._file(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._file(name))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._file(name)) as f:
            return f.read().decode()

    def delete(self, name: str) -> None:
        if self.is_file(name):
            self.fs.delete_file(self._file(name))

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        self.write_bytes(name, buf.getvalue())

    def read_table(self, name: str) -> pd.DataFrame | None:
        import pyarrow.parquet as pq

        if not self.exists(name):
            return None
        with self.fs.open_input_file(self._file(name)) as f:
            return pq.read_table(f).to_pandas()

    def check_writable(self, key: str = "run.storage_path") -> None:
        """Write, then remove, a probe file (and the folders it needed); an error names ``key`` and the location.
        Nothing stays behind, so a failed start leaves no directory."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        created = self._first_missing()
        try:
            self.write_text(probe, "ok")
            self.delete(probe)
        except Exception as e:
            raise StorageError(f"cannot write to {key}={self.uri}: {e}") from e
        finally:
            if created is not None and self.is_local:  # leave no folder behind that the probe made
                try:
                    self.fs.delete_dir(created)
                except OSError:
                    pass

    def _first_missing(self) -> str | None:
        """The outermost folder of this path that does not exist yet (a local path only), or None."""
        if not self.is_local:
            return None
        path, missing = Path(self.path), None
        while not path.exists() and path != path.parent:
            missing, path = path, path.parent
        return str(missing) if missing is not None else None

    # -- config ------------------------------------------------------------------------------
    def config(self) -> DictConfig | None:
        """The run's resolved ``config.yaml`` (typed), or None when there is none."""
        from omegaconf import OmegaConf

        if not self.is_file("config.yaml"):
            return None
        return from_dict(OmegaConf.to_container(OmegaConf.create(self.read_text("config.yaml"))),  # type: ignore[arg-type]
                         f"{self.uri}/config.yaml")

    def write_config(self, cfg: DictConfig) -> None:
        from rayexperts.config import to_yaml

        self.write_text("config.yaml", to_yaml(cfg))

    def holds_run_of(self, cfg: DictConfig, keys: Sequence[str] = IDENTITY_KEYS) -> bool:
        """True when this directory already holds a run (``config.yaml``) agreeing with ``cfg`` on ``keys``;
        False when it holds none; :class:`CheckpointMismatch` when it holds a run of another configuration."""
        from omegaconf import OmegaConf

        if not self.is_file("config.yaml"):
            return False
        old = OmegaConf.create(self.read_text("config.yaml"))
        diffs = [f"{k}: {OmegaConf.select(old, k)!r} there vs {OmegaConf.select(cfg, k)!r} now"
                 for k in keys if OmegaConf.select(old, k) != OmegaConf.select(cfg, k)]
        if diffs:
            raise CheckpointMismatch(f"run directory {self.uri} holds a run of another configuration "
                                     f"({'; '.join(diffs)}); choose another run.name or remove that directory")
        return True

    # -- checkpoints ---------------------------------------------------------------------------
    def registered_checkpoint(self) -> dict[str, Any]:
        """The latest checkpoint Ray Train registered (what a re-run resumes from):
        ``{"checkpoint_dir_name": ..., "metrics": {...}}`` from its snapshot file, or ``{}``.
        A worker's reports reach Ray's controller when it polls, so a newer ``checkpoint_*``
        directory may exist that Ray has not registered."""
        try:
            return json.loads(self.read_text(SNAPSHOT_FILE)).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            return {}

    def latest_checkpoint(self) -> RunDir | None:
        """The checkpoint directory Ray Train registered last, else the newest ``checkpoint_*``; None if none."""
        latest = self.registered_checkpoint().get("checkpoint_dir_name")
        if latest and self.child(latest).is_file(CHECKPOINT_FILE):
            return self.child(latest)
        if not self.exists():
            return None
        found = sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                       if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
        found = [name for name in found if self.child(name).is_file(CHECKPOINT_FILE)]
        return self.child(found[-1]) if found else None

    def load_checkpoint(self, ident: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The latest checkpoint's state (CPU tensors), or None when there is none; ``ident`` refuses
        a checkpoint of another configuration. A URI's file is copied to a local temp dir first."""
        latest = self.latest_checkpoint()
        if latest is None:
            return None
        if latest.is_local:
            return load_checkpoint(latest.path, ident)
        with tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(latest._file(CHECKPOINT_FILE), str(Path(tmp) / CHECKPOINT_FILE), source_filesystem=latest.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            return load_checkpoint(tmp, ident)

    def get_file(self, name: str, local_path: str) -> None:
        """Copy file ``name`` of this directory to ``local_path``."""
        pafs.copy_files(self._file(name), local_path, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def put_checkpoint(self, local_dir: str, epoch: int, keep: int) -> RunDir:
        """Store the checkpoint in ``local_dir`` as ``checkpoint_<epoch>`` (written under a temporary name,
        then moved into place) and delete all but the newest ``keep`` ``checkpoint_*`` directories."""
        name = f"checkpoint_{epoch:06d}"
        tmp = self.child(f".{name}.{uuid.uuid4().hex}.tmp")
        tmp.create()
        for f in Path(local_dir).iterdir():
            pafs.copy_files(str(f), tmp._file(f.name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        target = self.child(name)
        if target.exists():
            self.fs.delete_dir(target.path)
        self.fs.move(tmp.path, target.path)
        found = sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                       if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
        for old in found[:-keep] if keep > 0 else []:
            self.fs.delete_dir(self.child(old).path)
        return target

    def finished(self, epochs: int) -> bool:
        """True when the latest checkpoint holds the end of epoch ``epochs`` (the run needs no more training)."""
        state = self.load_checkpoint()
        return state is not None and int(state["epoch"]) >= epochs

    def holds_finished_run(self, cfg: DictConfig, keys: Sequence[str] = IDENTITY_KEYS) -> bool:
        """True when this directory holds ``cfg``'s run (:meth:`holds_run_of` on ``keys``) with the checkpoint and
        the evaluation of its last epoch: nothing is left to train."""
        if not self.holds_run_of(cfg, keys):
            return False
        metrics = self.read_table("metrics.parquet")
        if metrics is None or metrics.empty or int(metrics["epoch"].max()) < int(cfg.train.epochs) - 1:
            return False
        return self.finished(int(cfg.train.epochs))

    def check_schedule(self, cfg: DictConfig) -> None:
        """Refuse to resume a checkpointed run with another schedule (:data:`SCHEDULE_KEYS`): its epochs so far
        followed the old one. ``run.allow_extend=true`` trains on with the new schedule (recorded in config.yaml).
        Any other key that can change a result (:func:`rayexperts.config.result_settings`) and changed is named in
        a note; keys that cannot (paths, resources, ``run.*``, ``tune.*``) are not compared."""
        from omegaconf import OmegaConf

        if not self.is_file("config.yaml") or self.latest_checkpoint() is None:
            return
        old = result_settings(OmegaConf.to_container(OmegaConf.create(self.read_text("config.yaml"))))
        new = result_settings(cfg)
        changed = [k for k in sorted(set(old) & set(new)) if str(old[k]) != str(new[k])]  # keys both versions know
        diffs = [f"{k}={old[k]!r} there, {new[k]!r} now" for k in changed if k in SCHEDULE_KEYS]
        if diffs and not bool(OmegaConf.select(cfg, "run.allow_extend")):
            raise ScheduleChanged(f"run directory {self.uri} was trained with another schedule ({'; '.join(diffs)}): "
                                  "resuming would mix two schedules. Set run.allow_extend=true to train on with the "
                                  "new one, or choose another run.name")
        others = [f"{k}={old[k]!r} there, {new[k]!r} now" for k in changed if k not in SCHEDULE_KEYS]
        if others:
            shown = "; ".join(others[:5]) + ("; …" if len(others) > 5 else "")
            print(f"[rayexperts] note: resuming {self.uri} with changed settings ({shown}): its epochs so far were "
                  "trained with the old ones", flush=True)

    def mark_failed(self, error: str) -> None:
        """Mark a run that failed before its first evaluation (no metrics yet): ``FAILED`` beside ``error.log``."""
        if not self.is_file("metrics.parquet"):
            self.write_text(FAILED_MARK, error + "\n")

    def clear_failed(self) -> None:
        self.delete(FAILED_MARK)
