"""Batched augmentation with per-sample randomness, on whatever device holds the batch (issue 15).

Every recipe of :mod:`rayexperts.data.augment.recipes` runs here as well as per image: each image of a batch gets
its own operations and parameters, drawn from the same distribution as the per-image transform draws them, and an
operation with given parameters gives the per-image transform's pixels (to 1/255: a resize may round the other
way). Images enter as ``uint8`` ``[B, C, H, W]`` and leave as normalised ``float32``.

How each is done, and why not kornia: torchvision's per-image transforms define the pixels this project trains on
(the papers' code uses torchvision), and kornia's operations are not the same functions (its colour jitter, random
resized crop sampling and auto-augment policies differ), so they would not reproduce them. By concern:

* :mod:`.core`: the generators (:class:`~.core.BatchRng`), one parameter copy per call, per-device constants, the
  :class:`~.core.Step` protocol (plan on the CPU, apply on the device), grouping images by operation;
* :mod:`.geometry` and :mod:`.colour`: continuous parameters (crop offsets, flips, random resized crops, affine
  digits jitter, Cutout; colour jitter factors and order, grayscale, Gaussian blur) in own vectorised torch code
  that repeats torchvision's arithmetic per sample;
* :mod:`.autoaugment`: torchvision's RandAugment and AutoAugment, images grouped by (operation, magnitude, sign),
  each group through torchvision's own operation;
* :mod:`.pil` and :mod:`.timm_randaugment`: Pillow's arithmetic in torch, for timm's RandAugment, the PIL Gaussian
  blur and the PIL rotation;
* :mod:`.pipelines`: each recipe op's steps, :class:`~.pipelines.BatchPipeline`, ``batch_transform`` and
  ``batch_moco_transform``.
"""
