"""Part C, the nvJPEG stream race (GPU finding F4): batched JPEG decodes while queued kernels still read freed
memory of the outputs' size, without and with the project's stream sync (``decode_batch``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rayexperts.config import load_config

pytestmark = pytest.mark.gpu
REPS = 30


class _Named:
    def describe(self, i: int) -> str:
        return f"test image {i}"


def jpeg_blobs(data: list[str], n: int = 256, size: int = 224) -> list[torch.Tensor]:
    """``n`` JPEGs of the check's training images, upscaled to ``size`` (ImageNet-sized outputs)."""
    from torchvision.io import encode_jpeg

    from rayexperts.data import build_dataset

    cfg = load_config(None, [*data, "run.verbose=false"])
    images = torch.from_numpy(build_dataset(cfg.data).train.images[:n])
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    big = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return [encode_jpeg(img.round().clamp(0, 255).to(torch.uint8), quality=90) for img in big]


def race(device: torch.device, decode, refs: list[torch.Tensor], reps: int, size: int = 8192) -> tuple[int, int]:
    """Decode ``reps`` times while sums over just-freed tensors of the outputs' sizes are still queued behind a
    long matmul: (wrong sums, wrong decodes)."""
    bad_sums = bad_decodes = 0
    for _ in range(reps):
        baits = [torch.ones(r.shape, dtype=torch.uint8, device=device) for r in refs]
        big = torch.randn(size, size, device=device)
        slow = big @ big
        for _ in range(3):  # ~50-100 ms of queued work before the sums
            slow = slow @ big
        sums = torch.stack([b.sum() for b in baits])  # queued behind the matmul, reading the baits
        expected = torch.tensor([b.numel() for b in baits], device=device)
        del baits, big
        out = decode()
        torch.cuda.synchronize(device)
        bad_sums += int((sums != expected).sum())
        bad_decodes += sum(not torch.equal(o, r) for o, r in zip(out, refs))
        del slow, out
    return bad_sums, bad_decodes


@pytest.fixture(scope="module")
def jpegs(cuda) -> SimpleNamespace:
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = jpeg_blobs(cuda.data)
    torch.cuda.synchronize(cuda.device)
    refs = [r.clone() for r in decode_jpeg(blobs, mode=ImageReadMode.RGB, device=cuda.device)]
    torch.cuda.synchronize(cuda.device)
    return SimpleNamespace(blobs=blobs, refs=refs, device=cuda.device)


def test_nvjpeg_race_without_sync(jpegs, note):
    """Information: whether torchvision's batched decode alone reproduces the race on this machine."""
    from torchvision.io import ImageReadMode, decode_jpeg

    sums, decodes = race(jpegs.device, lambda: decode_jpeg(jpegs.blobs, mode=ImageReadMode.RGB, device=jpegs.device),
                         jpegs.refs, REPS)
    note.info("nvjpeg_race.without_sync", wrong_sums=sums, wrong_decodes=decodes, reps=REPS, images=len(jpegs.blobs),
              reproduced=sums + decodes > 0)


def test_decode_batch_with_sync(jpegs, note):
    from rayexperts.data.encoded import decode_batch

    index = list(range(len(jpegs.blobs)))
    sums, decodes = race(jpegs.device, lambda: decode_batch(jpegs.blobs, jpegs.device, _Named(), index),  # type: ignore[arg-type]
                         jpegs.refs, REPS)
    note(wrong_sums=sums, wrong_decodes=decodes, reps=REPS)
    assert (sums, decodes) == (0, 0)
