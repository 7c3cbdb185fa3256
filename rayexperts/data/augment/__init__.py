"""Augmentation: every recipe once, as data (:mod:`.recipes`), and two back ends that map its op names to their
implementations: :mod:`.per_image` (torchvision, one image at a time, in DataLoader workers) and :mod:`.batched`
(a batch on its device, per-sample randomness, no host synchronisation)."""
