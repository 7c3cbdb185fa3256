"""``rayexperts export RUN_DIR --format torchscript|onnx|safetensors [--view V] [--out DIR]``.

The view's whole computation (:func:`~rayexperts.inference.load.load`: the method's forward pass, the view's
function of it, the PC or prior adjustment, the router, ``eval.tta_flip``) as a standalone model:

- ``torchscript``: ``model.pt``, ``torch.jit.trace`` of the module (``torch.jit.load`` runs it without rayexperts);
- ``onnx``: ``model.onnx`` (opset 17, the batch axis dynamic), checked with ``onnx.checker`` and, when it is
  installed, run with onnxruntime;
- ``safetensors``: ``model.safetensors``, the module's state dict (the trained model and what the view holds);
  :func:`load_export` rebuilds the module from it and ``export.json`` (the run's resolved config is there).

Each is checked at export against ``load()`` on a batch other than the one it was traced with (the max abs
difference printed; above :data:`TOLERANCE` the export is refused and nothing is written). Beside it,
``export.json``: the classes, the preprocessing (:meth:`Preprocess.describe`), the provenance (run, config hash,
view, checkpoint, selection, epochs) and the check. The folder is written under a temporary name and moved into
place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from rayexperts.errors import ConfigError
from rayexperts.inference.load import LoadedModel, RunSpec, build, resolve

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
TOLERANCE = 1e-4
BATCH = 8


class ExportRefused(ConfigError):
    """An exported model does not compute what ``load()`` computes (above the tolerance)."""


def _inputs(module: LoadedModel, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs of the preprocessed shape: normal noise (the normalised images' scale)."""
    from rayexperts.inference.predict import _probe_image

    shape = tuple(module.preprocess(_probe_image(module.preprocess)).shape)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _write(module: LoadedModel, fmt: str, path: Path, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(path))
        elif fmt == "onnx":
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17)
        else:
            from safetensors.torch import save_model

            save_model(module, str(path))


def _run_export(fmt: str, path: Path, x: torch.Tensor, spec: RunSpec, epoch: int) -> tuple[torch.Tensor, str]:
    """The exported file's logits on ``x`` and how they were computed."""
    if fmt == "torchscript":
        with torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation note
                return torch.jit.load(str(path))(x), "torch.jit.load"
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(str(path))
        try:
            import onnxruntime as ort
        except ImportError:
            return torch.full((x.shape[0], len(spec.classes)), float("nan")), "onnx.checker only (no onnxruntime)"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), f"onnxruntime {ort.__version__}"
    with torch.no_grad():
        return load_safetensors(path, spec, epoch)(x), "rayexperts.inference.export.load_safetensors"


def load_safetensors(path: Path, spec: RunSpec, epoch: int = 0) -> LoadedModel:
    """The module of ``spec`` with the weights of the safetensors file ``path`` (not the checkpoint's)."""
    from safetensors.torch import load_model

    module = build(spec, epoch=epoch, weights=False)
    load_model(module, str(path), strict=True)
    return module.eval()


def load_export(directory: str) -> LoadedModel:
    """The module of a ``safetensors`` export (``export.json`` beside it), without the run's checkpoint."""
    from rayexperts.config import from_dict
    from rayexperts.rundir import RunDir

    meta = json.loads((Path(directory) / "export.json").read_text())
    if meta["format"] != "safetensors":
        raise ConfigError(f"{directory}: load_export rebuilds safetensors exports; this one is {meta['format']}")
    cfg = from_dict(meta["config"], f"{directory}/export.json")
    run = RunDir(meta["run"])
    spec = RunSpec(run, cfg, meta["view"], meta["views"], run.child(meta["checkpoint"]), meta["selection"],
                   meta["classes"], meta["train_counts"], meta["config_hash"])
    return load_safetensors(Path(directory) / FORMATS["safetensors"], spec, int(meta["epochs_trained"]))


def export(run_dir: str, fmt: str, view: str | None = None, out: str | None = None, checkpoint: str = "last",
           ) -> dict[str, Any]:
    """Export ``run_dir``'s ``view`` as ``fmt`` into ``out`` (default ``RUN_DIR/export/<view>-<fmt>``); returns
    what ``export.json`` holds. Refused (ExportRefused, nothing written) above :data:`TOLERANCE`."""
    import rayexperts
    from rayexperts.config import to_dict

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ConfigError("--format onnx needs the onnx package: pip install 'rayexperts[export]'") from None
    spec = resolve(run_dir, view, checkpoint)
    if not spec.run.is_local and out is None:
        raise ConfigError(f"run {run_dir} is not on a local disk: give --out DIR")
    target = Path(out or f"{spec.run.path}/export/{spec.view}-{fmt}").expanduser().resolve()
    module = build(spec)
    example, check = _inputs(module, BATCH, 0), _inputs(module, BATCH - 3, 1)  # another batch size: dynamic batch
    with torch.no_grad():
        expected = module(check)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_parent(target)))
    try:
        path = tmp / FORMATS[fmt]
        _write(module, fmt, path, example)
        got, how = _run_export(fmt, path, check, spec, module.epoch)
        diff = float((got.float() - expected).abs().max())
        if diff != diff and "onnxruntime" not in how:  # NaN: not run (no onnxruntime), only checked
            diff_text = "not run"
        elif not diff <= TOLERANCE:
            raise ExportRefused(f"the {fmt} export of view {spec.view} differs from load() by {diff:.3g} (max abs, "
                                f"over {TOLERANCE:g}): refused, nothing written")
        else:
            diff_text = f"{diff:.3g}"
        meta = {
            "format": fmt, "file": FORMATS[fmt], "view": spec.view, "views": spec.views, "classes": spec.classes,
            "train_counts": spec.train_counts, "num_classes": len(spec.classes),
            "input": {"name": "images", "shape": ["batch", *example.shape[1:]], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", len(spec.classes)], "dtype": "float32",
                       "meaning": "the view's logits: softmax gives the probabilities"},
            "preprocessing": module.preprocess.describe(),
            "run": spec.run.uri, "config_hash": spec.config_hash, "method": str(spec.cfg.method),
            "checkpoint": spec.checkpoint.uri.rsplit("/", 1)[-1], "selection": spec.selection,
            "epochs_trained": module.epoch, "check": {"max_abs_diff": diff_text, "against": "load()", "by": how,
                                                     "batch": int(check.shape[0]), "tolerance": TOLERANCE},
            "rayexperts_version": rayexperts.__version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": to_dict(spec.cfg),
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=1, default=str))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["out"] = str(target)
    return meta


def _parent(target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    return str(target.parent)


def main(run_dir: str, fmt: str, view: str | None, out: str | None, checkpoint: str) -> int:
    meta = export(run_dir, fmt, view, out, checkpoint)
    print(f"{meta['out']}/{meta['file']}: view {meta['view']} of {meta['run']} (checkpoint {meta['checkpoint']}, "
          f"{meta['selection']}, epoch {meta['epochs_trained']})")
    print(f"checked against load() on a batch of {meta['check']['batch']} ({meta['check']['by']}): max abs "
          f"difference {meta['check']['max_abs_diff']}")
    print(f"{meta['out']}/export.json: classes, preprocessing, provenance")
    return 0
