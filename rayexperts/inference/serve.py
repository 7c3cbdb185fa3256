"""``rayexperts serve RUN_DIR [--view V] [--port P]``: a Ray Serve application of a trained view.

``POST /`` with an image file's bytes as the body answers ``{"label", "class_name", "prob", "probs"}`` (``probs``:
one probability per class, in class order); with a JSON body, ``{"image": BASE64}`` answers the same and
``{"images": [BASE64, ...]}`` (or a JSON list of them) ``{"predictions": [...]}``. An image that cannot be decoded
answers status 400 with ``{"error": ...}``. ``GET /health`` answers ``{"status": "ok", "view", "classes", ...}``.
Requests are batched across clients (``@serve.batch``: up to ``max_batch_size`` images, waiting at most
``batch_wait_s`` for a batch to fill) and each batch is one forward pass of :func:`~rayexperts.inference.load.load`'s
module. On a cluster: ``serve run rayexperts.inference.serve:app run_dir=/shared/runs/NAME [view=V]``
(docs/inference.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from ray import serve

DEFAULT_PORT = 8000


@serve.deployment(name="rayexperts")
class Classifier:
    """One replica: the loaded view, its preprocessing, and the batched forward pass."""

    def __init__(self, run_dir: str, view: str | None, checkpoint: str = "last", threads: int = 1,
                 max_batch_size: int = 32, batch_wait_s: float = 0.005) -> None:
        import torch

        from rayexperts.inference.load import load

        if threads > 0:
            torch.set_num_threads(threads)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model = load(run_dir, view, checkpoint, device=device)
        self.device = device
        self._classify.set_max_batch_size(max_batch_size)
        self._classify.set_batch_wait_timeout_s(batch_wait_s)
        self.batches: list[int] = []  # the size of every batch run (the /health route reports the recent ones)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify(self, images: list[Any]) -> list[dict[str, Any]]:
        import torch

        x = torch.stack(images).to(self.device)
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float(), dim=1).cpu()
        self.batches = [*self.batches[-99:], len(images)]
        out = []
        for p in probs:
            label = int(p.argmax())
            out.append({"label": label, "class_name": self.model.classes[label], "prob": float(p[label]),
                        "probs": [float(v) for v in p]})
        return out

    def _decode(self, data: bytes) -> Any:
        return self.model.preprocess(data)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET":
            if path.endswith("/health"):
                return JSONResponse({"status": "ok", "view": self.model.view, "classes": self.model.classes,
                                     "selection": self.model.selection, "run": self.model.run_dir,
                                     "recent_batch_sizes": self.batches[-20:]})
            return JSONResponse({"error": "GET /health, or POST / with an image"}, status_code=404)
        body = await request.body()
        many = False
        images: list[bytes] = [body]
        if "json" in request.headers.get("content-type", ""):
            try:
                payload = json.loads(body)
                if isinstance(payload, dict) and "images" in payload:
                    payload, many = payload["images"], True
                elif isinstance(payload, dict):
                    payload = payload["image"]
                many = many or isinstance(payload, list)
                images = [base64.b64decode(s, validate=True) for s in (payload if many else [payload])]
            except (ValueError, KeyError, TypeError) as e:
                return JSONResponse({"error": f"JSON body: give {{\"image\": BASE64}} or {{\"images\": [BASE64, ...]}} "
                                              f"({type(e).__name__}: {e})"}, status_code=400)
        tensors = []
        for i, data in enumerate(images):
            try:
                tensors.append(self._decode(data))
            except Exception as e:  # noqa: BLE001 - an undecodable image is the client's error
                return JSONResponse({"error": f"image {i}: cannot decode ({type(e).__name__})"}, status_code=400)
        results = await asyncio.gather(*(self._classify(x) for x in tensors))
        return JSONResponse({"predictions": list(results)} if many else results[0])


def build_app(run_dir: str, view: str | None = None, checkpoint: str = "last", num_cpus: float = 1.0,
              num_gpus: float = 0.0, replicas: int = 1, max_batch_size: int = 32, batch_wait_s: float = 0.005):
    """The Serve application of ``run_dir``'s ``view`` (checked here, in one line, before anything starts)."""
    from rayexperts.inference.load import resolve

    spec = resolve(run_dir, view, checkpoint)
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    return Classifier.options(num_replicas=replicas, ray_actor_options=options).bind(
        spec.run.uri, spec.view, checkpoint, max(1, round(num_cpus)), max_batch_size, batch_wait_s)


def app(args: dict[str, str]):
    """``serve run rayexperts.inference.serve:app run_dir=... [view=...] [checkpoint=...] [num_gpus=1]``."""
    return build_app(args["run_dir"], args.get("view"), args.get("checkpoint", "last"),
                     float(args.get("num_cpus", 1)), float(args.get("num_gpus", 0)), int(args.get("replicas", 1)))


def start(run_dir: str, view: str | None = None, port: int = DEFAULT_PORT, checkpoint: str = "last",
          host: str = "127.0.0.1", num_cpus: float = 1.0, num_gpus: float = 0.0) -> str:
    """Start the application on ``host:port`` on the running Ray instance; returns its URL."""
    application = build_app(run_dir, view, checkpoint, num_cpus, num_gpus)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(application, name="rayexperts", route_prefix="/")
    return f"http://{host}:{port}/"


def main(run_dir: str, view: str | None, port: int, checkpoint: str, num_gpus: float) -> int:
    import time

    from rayexperts.inference.load import resolve
    from rayexperts.launch.cluster import ensure_ray

    spec = resolve(run_dir, view, checkpoint)  # bad input: one line before Ray starts
    ensure_ray(dashboard=False)
    url = start(spec.run.uri, spec.view, port, checkpoint, num_gpus=num_gpus)
    print(f"serving view {spec.view} of {spec.run} ({spec.selection}) at {url}: POST an image, GET {url}health; "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("stopped")
    return 0
