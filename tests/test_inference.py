"""Trained models out (docs/inference.md): ``rayexperts.load``, ``eval``, ``predict`` (Ray Data), ``export`` and
``serve`` (Ray Serve) reproduce the run's own evaluation, on short digits-lt runs of several method families
trained once in this process (a few seconds each) and the session's CBD job."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import quick_overrides

# method -> (extra overrides, the view checked). One epoch each except CE (two: best_test picks between them).
RUNS = {
    "ce": ({"train.epochs": 2}, "expert0_pc"),
    "mllt": ({"train.epochs": 1}, "ensemble_pc"),
    "ncl": ({"train.epochs": 1}, "ensemble"),
    "ecl": ({"train.epochs": 1}, "ensemble"),
    "ldam_drw": ({"train.epochs": 1}, "expert0"),
    "sade": ({"train.epochs": 1, "sade.tta_epochs": 1}, "ensemble"),
    "balpoe": ({"train.epochs": 1, "balpoe.test_prior": "[8,4,2,1,1,1,1,1,1,1]"}, "ensemble_prior"),
    "ride": ({"train.epochs": 1}, "ensemble"),
    "ride_ea": ({"train.epochs": 1}, "router"),
    # a tiny timm ViT (its own mean/std and LIFT's resize-and-crop test view must reach the loaded module)
    "lift": ({"train.epochs": 1}, "expert0"),
}


def _train(root: Path, method: str, extra: dict) -> Path:
    from rayexperts.config import load_config
    from rayexperts.engine.entry import train_one_worker
    from rayexperts.rundir import RunDir

    from rayexperts.registry import METHODS

    demo = METHODS.get(method).demo_overrides  # what the method needs on digits (LIFT: a tiny timm ViT)
    cfg = load_config(None, [f"method={method}", *demo, *quick_overrides(root, method, **extra)])
    RunDir.for_config(cfg).write_config(cfg)
    train_one_worker(cfg, threads=1)
    return root / "runs" / method


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One short in-process run per method (RIDE's router on the RIDE run), about 15 s in all."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("inference")
    out: dict[str, Path] = {}
    try:
        for method, (extra, _) in RUNS.items():
            if method == "ride_ea":
                extra = {**extra, "ride_ea.experts_run": str(out["ride"])}
            out[method] = _train(root, method, extra)
    finally:
        torch.set_num_threads(threads)
    return out


def _test_images(cfg) -> tuple[list[torch.Tensor], np.ndarray]:
    from rayexperts.data import build_dataset

    data = build_dataset(cfg.data)
    return [data.test[i][0] for i in range(len(data.test))], data.test.labels


def _engine_logits(run_dir: Path, view: str) -> torch.Tensor:
    """The view's logits as the run's evaluation computes them: the engine's Run, its test loader, the method's
    predict (rayexperts.engine.loop.evaluate's calls), the checkpoint's weights."""
    from rayexperts.engine.run import Run
    from rayexperts.rundir import RunDir, unwrap

    rundir = RunDir(str(run_dir))
    cfg = rundir.config()
    cfg.run.verbose = False
    run = Run(cfg)
    unwrap(run.model).load_state_dict(rundir.load_checkpoint()["model"])
    run.eval_model.eval()
    chunks = []
    for items in run.eval_loaders[""]:
        batch = run.opts.batch(items)
        logits, _, _ = run.method.predict(run.eval_model, batch.images)
        chunks.append(logits[view].float())
    return torch.cat(chunks)


def _last_metrics(run_dir: Path) -> pd.DataFrame:
    m = pd.read_parquet(run_dir / "metrics.parquet")
    return m[m["epoch"] == m["epoch"].max()].set_index("view")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(RUNS) - {"ride"}))  # RIDE's views are ride_ea's experts' too
def test_load_computes_the_runs_evaluation(runs, method, one_torch_thread):
    """load(): logits within 1e-5 of the engine's evaluation, the same top-1 as metrics.parquet's last row."""
    import rayexperts

    view = RUNS[method][1]
    model = rayexperts.load(str(runs[method]), view=view)
    assert model.view == view and model.classes == [str(c) for c in range(10)] and model.selection == "last"
    assert model.epoch == int(model.config.train.epochs) and not any(p.requires_grad for p in model.parameters())
    images, labels = _test_images(model.config)
    with torch.no_grad():
        got = model(torch.stack([model.preprocess(x) for x in images]))
    expected = _engine_logits(runs[method], view)
    assert got.shape == expected.shape == (300, 10)
    assert float((got - expected).abs().max()) <= 1e-5
    assert torch.equal(got.argmax(1), expected.argmax(1))
    top1 = float((got.argmax(1).numpy() == labels).mean())
    assert top1 == pytest.approx(_last_metrics(runs[method]).loc[view, "top1"], abs=1e-12)
    # The default is the method's primary view; bytes and PIL images go through the same transform.
    from rayexperts.registry import METHODS

    assert rayexperts.load(str(runs[method])).view == METHODS.get(method).primary_view
    from PIL import Image

    pil = Image.fromarray(images[0].numpy()[0])
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    assert torch.equal(model.preprocess(buf.getvalue()), model.preprocess(images[0]))
    assert torch.equal(model.preprocess(pil), model.preprocess(images[0]))


@pytest.mark.slow
def test_best_test_checkpoint_and_the_transductive_view(runs, one_torch_thread):
    from rayexperts.errors import ConfigError
    from rayexperts.inference.load import load

    metrics = pd.read_parquet(runs["ce"] / "metrics.parquet")
    rows = metrics[metrics["view"] == "expert0_pc"].sort_values("epoch")
    best_epoch = int(rows.loc[rows["top1"].idxmax(), "epoch"])  # the earliest on a tie (idxmax: the first)
    model = load(str(runs["ce"]), "expert0_pc", checkpoint="best_test")
    assert model.selection == "best_test (selected on the test set)" and model.epoch == best_epoch + 1
    images, labels = _test_images(model.config)
    with torch.no_grad():
        top1 = float((model(torch.stack([model.preprocess(x) for x in images])).argmax(1).numpy() == labels).mean())
    assert top1 == pytest.approx(rows["top1"].max(), abs=1e-12)
    with pytest.raises(ConfigError, match="tta_aggregate .*transductive.*not saved in the checkpoint"):
        load(str(runs["sade"]), "tta_aggregate")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "sade"])
def test_eval_writes_the_runs_metrics_again(runs, method, one_torch_thread, capsys):
    """``rayexperts eval RUN_DIR`` on the run's own test split: every view (SADE's tta_aggregate re-learnt) equals
    metrics.parquet's last rows; a test distribution gets its own columns; the run's files are untouched."""
    from rayexperts.cli import main
    from rayexperts.engine.results import METRIC_COLUMNS

    run = runs[method]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "Many" in printed and "ECE" in printed and "written:" in printed
    got = pd.read_parquet(run / "eval" / "test.parquet").set_index("view")
    last = _last_metrics(run)
    assert set(METRIC_COLUMNS) - {"view"} <= set(got.columns) and sorted(got.index) == sorted(last.index)
    for col in ("epoch", "top1", "top1_many", "top1_medium", "top1_few", "ece", "num_samples", "transductive"):
        pd.testing.assert_series_equal(got[col].sort_index(), last[col].sort_index(), check_dtype=False, atol=1e-12)
    if method == "ce":  # the test-agnostic distributions, with their own columns, named by the overrides
        assert main(["eval", str(run), "eval.test_distributions=[forward10]"]) == 0
        dist = pd.read_parquet(run / "eval" / "eval.test_distributions=forward10.parquet")
        assert {"forward10_top1", "forward10_top1_many", "forward10_ece"} <= set(dist.columns)
        assert (dist["forward10_num_samples"] < 300).all()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("method,fmt", [("mllt", "torchscript"), ("ride_ea", "onnx"), ("balpoe", "safetensors")])
def test_export_round_trips(runs, method, fmt, tmp_path, one_torch_thread, capsys):
    from rayexperts.cli import main
    from rayexperts.inference.load import load

    view = RUNS[method][1]
    out = tmp_path / "exported"
    assert main(["export", str(runs[method]), "--format", fmt, "--view", view, "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    meta = json.loads((out / "export.json").read_text())
    assert meta["view"] == view and meta["classes"] == [str(c) for c in range(10)] and meta["selection"] == "last"
    assert meta["run"] == str(runs[method]) and len(meta["config_hash"]) == 64 and meta["format"] == fmt
    assert meta["preprocessing"]["mean"] == [0.3053] and meta["preprocessing"]["image_size"] == 8
    model = load(str(runs[method]), view)
    images, _ = _test_images(model.config)
    x = torch.stack([model.preprocess(i) for i in images[:50]])
    with torch.no_grad():
        expected = model(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out / "model.pt"))(x)
        elif fmt == "onnx":
            ort = pytest.importorskip("onnxruntime")
            got = torch.from_numpy(ort.InferenceSession(str(out / "model.onnx")).run(None, {"images": x.numpy()})[0])
        else:
            from rayexperts.inference.export import load_export

            got = load_export(str(out))(x)
    assert float((got - expected).abs().max()) <= 1e-5 and torch.equal(got.argmax(1), expected.argmax(1))


def test_export_refused_above_the_tolerance_writes_nothing(runs, tmp_path, monkeypatch, capsys):
    from rayexperts.cli import main
    from rayexperts.inference import export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every difference (even 0) is above it
    out = tmp_path / "refused"
    assert main(["export", str(runs["ce"]), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused, nothing written" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _digits_folder(folder: Path, images: list[torch.Tensor]) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, x in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(x.numpy()[0]).save(paths[-1])
    return paths


def test_bad_input_is_one_line_and_status_2(runs, tmp_path, capsys):
    """A run without a checkpoint, an unknown view, a data set with other classes, a missing input: one line,
    exit status 2, nothing written."""
    import shutil

    from PIL import Image

    from rayexperts.cli import main

    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    for name in ("config.yaml", "classes.parquet", "metrics.parquet"):
        shutil.copy(runs["ce"] / name, empty / name)
    # Another data set: an imagefolder of 3 classes (a, b, c).
    folder = tmp_path / "abc"
    for split in ("train", "test"):
        for c in "abc":
            (folder / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / split / c / f"{i}.png")
    out = tmp_path / "out"
    cases = [
        (["eval", str(empty)], "has no checkpoint"),
        (["export", str(empty), "--format", "onnx", "--out", str(out)], "has no checkpoint"),
        (["predict", str(runs["ce"]), "--input", str(folder), "--out", str(out / "p.parquet"), "--view", "nope"],
         "unknown view 'nope'"),
        (["serve", str(runs["mllt"]), "--view", "ensembel"], "unknown view 'ensembel'"),
        (["eval", str(runs["ce"]), "data.name=imagefolder", f"data.root={folder}", "data.imbalance_factor=1"],
         "has 3 classes (a, b, c) but the model"),
        (["predict", str(runs["ce"]), "--input", str(tmp_path / "missing"), "--out", str(out / "p.parquet")],
         "does not exist"),
        (["eval", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not out.exists() and not (empty / "eval").exists()
    assert not [p for p in runs["ce"].rglob("*") if "imagefolder" in p.name]


@pytest.mark.ray
@pytest.mark.slow
def test_predict_on_ray_data(ray_cluster, runs, tmp_path, one_torch_thread):
    """A folder with one corrupt image: one row per file, the corrupt one with its error and null predictions,
    every other prediction that of load(); a Parquet of encoded images carries its id column through."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayexperts.inference.load import load
    from rayexperts.inference.predict import predict

    model = load(str(runs["mllt"]), "ensemble_pc")
    images, _ = _test_images(model.config)
    paths = _digits_folder(tmp_path / "images", images[:40])
    (tmp_path / "images" / "0007_corrupt.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "pred" / "p.parquet"
    summary = predict(str(runs["mllt"]), str(tmp_path / "images"), str(out), "ensemble_pc", top_k=3, workers=1,
                      cpus_per_worker=1.0, decode_cpus=0.5)
    assert summary["rows"] == 41 and summary["errors"] == 1
    df = pd.read_parquet(out)
    assert len(df) == 41 and list(df["path"]) == sorted(str(p) for p in [*paths, tmp_path / "images" / "0007_corrupt.png"])
    bad = df[df["path"].str.endswith("corrupt.png")].iloc[0]
    assert bad["error"] and pd.isna(bad["label"]) and pd.isna(bad["prob"]) and bad["topk_labels"] is None
    good = df[df["error"] == ""].reset_index(drop=True)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([model.preprocess(x) for x in images[:40]])), 1).numpy()
    assert list(good["label"].astype(int)) == list(probs.argmax(1))
    np.testing.assert_allclose(good["prob"].to_numpy(), probs.max(1), atol=1e-6)
    np.testing.assert_allclose(np.stack(good["topk_probs"]), -np.sort(-probs, 1)[:, :3], atol=1e-6)
    assert list(good["class_name"]) == [str(c) for c in probs.argmax(1)]
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was moved into place

    # Parquet input: an id column carried through, in input order; a null image is an error row.
    table = pa.table({"id": [f"img{i}" for i in range(5)],
                      "image": [p.read_bytes() for p in paths[:4]] + [None]})
    pq.write_table(table, tmp_path / "in.parquet")
    predict(str(runs["mllt"]), str(tmp_path / "in.parquet"), str(tmp_path / "q.parquet"), "ensemble_pc", top_k=1,
            decode_cpus=0.5)
    q = pd.read_parquet(tmp_path / "q.parquet")
    assert list(q["id"]) == [f"img{i}" for i in range(5)] and "image" not in q
    assert list(q["label"][:4].astype(int)) == list(probs.argmax(1)[:4]) and q["error"][4] and pd.isna(q["label"][4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_real_requests(ray_cluster, runs, one_torch_thread):
    from ray import serve

    from rayexperts.inference import serve as serving
    from rayexperts.inference.load import load

    model = load(str(runs["mllt"]), "ensemble_pc")
    images, _ = _test_images(model.config)
    paths = []
    from PIL import Image

    for x in images[:6]:
        buf = io.BytesIO()
        Image.fromarray(x.numpy()[0]).save(buf, format="PNG")
        paths.append(buf.getvalue())
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([model.preprocess(x) for x in images[:6]])), 1).numpy()
    port = _free_port()
    url = serving.start(str(runs["mllt"]), "ensemble_pc", port, num_cpus=0.5)
    try:
        health = json.loads(urllib.request.urlopen(url + "health", timeout=30).read())
        assert health["status"] == "ok" and health["view"] == "ensemble_pc" and health["classes"] == model.classes
        for data, p in zip(paths[:3], probs):
            got = json.loads(urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30).read())
            assert got["label"] == int(p.argmax()) and got["class_name"] == str(p.argmax())
            np.testing.assert_allclose(got["probs"], p, atol=1e-6)
        body = json.dumps({"images": [base64.b64encode(d).decode() for d in paths]}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        many = json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]
        assert [r["label"] for r in many] == list(probs.argmax(1))
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(urllib.request.Request(url, data=b"not an image"), timeout=30)
        assert bad.value.code == 400 and "cannot decode" in json.loads(bad.value.read())["error"]
    finally:
        serve.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_cbd_student_and_teacher_views(cbd_job, one_torch_thread):
    """The student's run directory: the student view alone (no teacher in the module), and the teacher ensemble
    (the frozen teachers inside the module), each as the run's evaluation computes it."""
    from rayexperts.inference.load import load

    student = cbd_job[0] / "student"
    model = load(str(student))
    assert model.view == "student" and len(model.held) == 0
    ensemble = load(str(student), "teacher_ensemble")
    assert len(ensemble.held) == 2
    images, labels = _test_images(model.config)
    x = torch.stack([model.preprocess(i) for i in images])
    last = _last_metrics(student)
    for m in (model, ensemble):
        with torch.no_grad():
            got = m(x)
        expected = _engine_logits(student, m.view)
        assert float((got - expected).abs().max()) <= 1e-5
        assert float((got.argmax(1).numpy() == labels).mean()) == pytest.approx(last.loc[m.view, "top1"], abs=1e-12)
