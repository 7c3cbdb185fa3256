"""``lift``: LIFT (Shi et al., ICML 2024, "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts"), as
the authors' code runs it (docs/methods.md "LIFT").

A pretrained ViT (CLIP ViT-B/16 in the presets: ``model.backbone=timm/vit_base_patch16_clip_224.openai``) stays
frozen; LIFT's AdaptFormer in every block and a cosine classifier train:

    block:   h ← h + MLP(LN2(h)) + s · W_up · ReLU(W_down · LN_new(h))     # s learnable (1 at the start), W_up = 0
    r      = 2^max(0, ⌊log2(C / 2L)⌋)                                      # the bottleneck (``lift.adapter_width`` 0)
    logits = 25 · ⟨f/‖f‖, w_k/‖w_k‖⟩                                       # model.cosine_scale, no bias
    L      = CE(z + τ · log π, y),  π_k = n_k / N, τ = 1                   # logit-adjusted; the test logits are raw

The classifier starts from the L2-normalised per-class means of the frozen (adapter-free) features of every
training image under the plain view (resize + centre crop of ``data.image_size``: ``lift.init=class_mean``), or
from the classes' CLIP text features (``lift.init=text_features`` with ``lift.text_features=FILE``: CLIP's text
tower does not run here; the file holds its embeddings, mapped into the image-feature space through the weights
file's visual projection). The class means are computed once, before the first epoch of a fresh run (the
engine's epoch hook); a resumed run or a loaded model takes the classifier from its checkpoint.

Test-time crop ensembling (the reported numbers) is the engine's ``eval.tta=fivecrop`` (views ``expert0_fivecrop``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, register_method

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput

SOURCE = "shijxcs/LIFT@661ead9"


@dataclass
class LiftOptions:
    tau: float = 1.0  # logit adjustment z + τ·log π in the loss (utils/losses.py LogitAdjustedLoss; the code's 1)
    # the classifier's start: class_mean (per-class mean of the frozen features), text_features (lift.text_features),
    # or none (uniform(-1, 1) rows, normalised: the code's _Classifier)
    init: Literal["class_mean", "text_features", "none"] = "class_mean"
    # lift.init=text_features: a file (.pt/.pth/.safetensors, one tensor) of the classes' text embeddings [C, D], in
    # class order; D = the backbone's feature width, or CLIP's joint width (mapped through model.weights' head.weight)
    text_features: Optional[str] = None
    adaptformer: bool = True  # LIFT's AdaptFormer in every transformer block (with model.finetune=linear)
    adapter_width: int = 0  # its bottleneck r; 0: the code's 2^max(0, floor(log2(C / 2L)))
    init_batch_size: int = 64  # images per forward pass of the class-mean initialisation (the code's 64)


def lift_adapter_width(num_classes: int, num_blocks: int) -> int:
    """The code's AdaptFormer bottleneck ``2**max(0, int(log2(C / (2L))))`` (models/peft_vit.py:94-97):
    ImageNet-LT ViT-B/16 (1000 classes, 12 blocks) 32, Places-LT 8, iNaturalist 2018 256, CIFAR-100 4."""
    return 2 ** max(0, int(math.log2(num_classes / (num_blocks * 2))))


def _adapter_module():
    """The torch classes, built on first use (resolving a config must not import torch)."""
    import torch
    from torch import nn

    class LiftAdaptFormer(nn.Module):
        """``s · W_up · ReLU(W_down · LN(h))`` (models/peft_modules.py AdaptFormer): a new LayerNorm, ``W_down``
        kaiming_normal(a=√5) with a zero bias, ``W_up`` and its bias zero, ``s`` a learnable scalar at 1."""

        def __init__(self, dim: int, width: int) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(dim)
            self.down_proj, self.up_proj = nn.Linear(dim, width), nn.Linear(width, dim)
            self.scale = nn.Parameter(torch.ones(1))
            nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

        def forward(self, h: Tensor) -> Tensor:
            return self.up_proj(torch.relu(self.down_proj(self.ln(h)))) * self.scale

    class LiftMlp(nn.Module):
        """A block's ``norm2`` and ``mlp`` with LIFT's AdaptFormer beside them, both on the block's stream ``h``:
        ``MLP(LN2(h)) + adapter(h)`` (the block's ``norm2`` becomes the identity). ``enabled=False``: the plain
        block (the code's ``use_tuner=False``)."""

        def __init__(self, norm: nn.Module, mlp: nn.Module, dim: int, width: int) -> None:
            super().__init__()
            self.norm, self.mlp, self.adapter = norm, mlp, LiftAdaptFormer(dim, width)
            self.enabled = True

        def forward(self, h: Tensor) -> Tensor:
            out = self.mlp(self.norm(h))
            return out + self.adapter(h) if self.enabled else out

    return LiftAdaptFormer, LiftMlp


def add_lift_adapters(backbone: nn.Module, num_classes: int, width: int = 0) -> int:
    """Give every ViT block of ``backbone`` (modules with ``norm2`` and ``mlp``) LIFT's AdaptFormer; returns the
    bottleneck used (``width``, or :func:`lift_adapter_width` for 0). The adapters train, nothing else changes."""
    from torch import nn

    _, LiftMlp = _adapter_module()
    blocks = [m for m in backbone.modules() if isinstance(getattr(m, "mlp", None), nn.Module)
              and isinstance(getattr(m, "norm2", None), nn.Module) and not isinstance(m.mlp, LiftMlp)]
    if not blocks:
        raise ConfigError("lift.adaptformer=true: the backbone has no transformer block (norm2 + mlp); LIFT's "
                          "AdaptFormer adapts ViTs (model.backbone=timm/vit_...), or set lift.adaptformer=false")
    width = int(width) or lift_adapter_width(num_classes, len(blocks))
    for block in blocks:
        dim = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).in_features
        block.mlp, block.norm2 = LiftMlp(block.norm2, block.mlp, dim, width), nn.Identity()
    return width


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch every LIFT adapter in ``model`` on or off (off: the frozen pretrained features)."""
    for m in model.modules():
        if hasattr(m, "adapter") and hasattr(m, "enabled"):
            m.enabled = enabled


def logit_adjusted_loss(logits: Tensor, targets: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """LIFT's loss ``CE(z + τ·log(n_k / N), y)``, batch mean (utils/losses.py LogitAdjustedLoss; the project's
    balanced softmax, docs/methods.md "Balanced softmax / logit adjustment")."""
    from rayexperts.losses import balanced_softmax_loss

    return balanced_softmax_loss(logits, targets, class_counts, tau)


def class_mean_weights(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``features`` and the counts: ``([C, d], [C])`` (summed over workers, then divided)."""
    import torch

    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).to(sums)
    return sums, counts


def text_feature_weights(text: Tensor, feature_dim: int, projection: Tensor | None) -> Tensor:
    """The classifier rows from CLIP text embeddings ``text`` [C, D] (trainer.py init_head_text_feat): each
    L2-normalised, then, when D is not the image feature's width, mapped by CLIP's visual projection
    (``t @ proj.T``; timm stores ``proj.T`` as the weights file's ``head.weight`` [D, d]) and normalised again."""
    import torch.nn.functional as F

    t = F.normalize(text.float(), dim=-1)
    if t.shape[1] == feature_dim:
        return t
    if projection is None or tuple(projection.shape) != (t.shape[1], feature_dim):
        raise ConfigError(f"lift.text_features: embeddings of width {t.shape[1]} need CLIP's visual projection "
                          f"[{t.shape[1]}, {feature_dim}] (head.weight in model.weights), "
                          f"{'found none' if projection is None else f'found {list(projection.shape)}'}")
    return F.normalize(t @ projection.float(), dim=-1)


@register_method("lift")
class Lift(Method):
    Options = LiftOptions
    # the code's CosineClassifier: uniform(-1, 1) rows (normed_linear) at scale 25 (utils/config.py:30); the
    # backbone frozen (the adapters are LIFT's own, added by build_model)
    defaults = {"model.num_experts": 1, "model.classifier": "normed_linear", "model.cosine_scale": 25.0,
                "model.finetune": "linear"}
    official = {
        "model.cosine_scale": (25.0, f"{SOURCE}:utils/config.py:30 (scale 25 overrides the class default 30)"),
        "data.drop_last": (False, f"{SOURCE}:trainer.py:175-192 (DataLoader without drop_last)", "B"),
    }
    path_keys = ("lift.text_features",)
    primary_view = "expert0"
    # digits-lt: a depth-2 timm ViT of random weights at the digits' 8 px (patch 2), LIFT's own views (data.augment
    # =lift_crop crops any image kind to the model's size, so a CIFAR check runs too)
    demo_overrides = ("model.backbone=timm/vit_tiny_patch16_224",
                      "model.timm_kwargs={img_size: 8, patch_size: 2, depth: 2, embed_dim: 32, num_heads: 2}",
                      "data.augment=lift_crop")

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.net: nn.Module | None = None
        self.device: torch.device | None = None
        self.adapter_width = 0

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        o, m = cfg.lift, cfg.model
        if int(m.num_experts) != 1:
            raise ConfigError(f"LIFT trains one classifier: model.num_experts must be 1, got {m.num_experts}")
        if m.classifier == "linear":
            raise ConfigError("LIFT's classifier is a cosine one: model.classifier=normed_linear (or cosine), got linear")
        if o.adaptformer and not str(m.backbone).startswith("timm/"):
            raise ConfigError(f"lift.adaptformer=true adapts a timm ViT (model.backbone=timm/<vit>), not {m.backbone}; "
                              "or set lift.adaptformer=false")
        if o.adaptformer and m.finetune != "linear":
            raise ConfigError(f"lift.adaptformer=true adds LIFT's adapters to the frozen backbone: model.finetune must "
                              f"be linear, got {m.finetune} (or set lift.adaptformer=false to use model.finetune alone)")
        if int(o.adapter_width) < 0 or int(o.init_batch_size) < 1:
            raise ConfigError(f"lift.adapter_width must be >= 0 (0: the code's) and lift.init_batch_size >= 1, got "
                              f"{o.adapter_width} and {o.init_batch_size}")
        if o.init == "text_features":
            if not o.text_features:
                raise ConfigError("lift.init=text_features needs lift.text_features=FILE: the classes' CLIP text "
                                  "embeddings [C, D] (CLIP's text tower does not run here); or lift.init=class_mean")
            if not os.path.isfile(os.path.expanduser(str(o.text_features))):
                raise ConfigError(f"lift.text_features={o.text_features}: no such file")

    # -- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        net = build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)
        if self.opts.adaptformer:
            self.adapter_width = add_lift_adapters(net.experts, self.num_classes, int(self.opts.adapter_width))
            if net.frozen_by_finetune:  # the names moved into the blocks' LiftMlp: what a checkpoint leaves out
                net.frozen_by_finetune = [n for n, p in net.named_parameters() if not p.requires_grad]
        self.net = net
        return net

    def setup(self, device: torch.device, memory_format: torch.memory_format) -> None:
        super().setup(device, memory_format)
        self.device = device

    def on_epoch(self, epoch: int) -> None:
        """Before the first epoch of a fresh run: the classifier's initialisation (``lift.init``)."""
        if epoch == 0 and self.net is not None and self.opts.init != "none":
            self.initialise_classifier(self.net)

    def initialise_classifier(self, net: nn.Module) -> None:
        import torch

        head = net.heads[0]
        with torch.no_grad():
            if self.opts.init == "text_features":
                rows = self._text_rows(int(head.weight.shape[1]))
            else:
                rows = self._class_means(net)
            head.weight.copy_(rows.to(head.weight))

    def _text_rows(self, feature_dim: int) -> Tensor:
        from rayexperts.models.weights import read_state_dict

        text = _read_tensor(str(self.opts.text_features))
        if text.dim() != 2 or text.shape[0] != self.num_classes:
            raise ConfigError(f"lift.text_features={self.opts.text_features}: expected [{self.num_classes}, D] "
                              f"(one row per class), got {list(text.shape)}")
        projection = None
        if text.shape[1] != feature_dim and self.cfg.model.weights:
            projection = read_state_dict(str(self.cfg.model.weights)).get("head.weight")
        return text_feature_weights(text, feature_dim, projection)

    def _class_means(self, net: nn.Module) -> Tensor:
        """The L2-normalised per-class mean of the adapter-free features of every training image under the plain
        view (trainer.py init_head_class_mean); each worker sums its share, the sums are added over workers."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.utils.data import DataLoader, Subset

        from rayexperts.data import TransformedDataset, build_dataset
        from rayexperts.data.augment.per_image import compose
        from rayexperts.data.augment.recipes import plain_recipe

        data = build_dataset(self.cfg.data)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        view = compose(plain_recipe(data.image_kind, int(self.cfg.data.image_size),
                                    plain_view_options(self.cfg, net, data.in_channels)))
        shard = Subset(TransformedDataset(data.train, view), range(rank, len(data.train), world))
        loader = DataLoader(shard, batch_size=int(self.opts.init_batch_size), num_workers=int(self.cfg.data.num_workers))
        device = self.device or next(net.parameters()).device
        sums = counts = None
        was_training = net.training
        net.eval()
        set_adapters(net, False)
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                for images, labels in loader:
                    feats = net(images.to(device)).features[0].float()
                    s, c = class_mean_weights(feats, labels.to(device), self.num_classes)
                    sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        finally:
            set_adapters(net, True)
            net.train(was_training)
        if sums is None:
            sums = torch.zeros(self.num_classes, net.feature_dim, dtype=torch.float64, device=device)
            counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        means = F.normalize((sums / counts.clamp(min=1).unsqueeze(1)).float(), dim=1)
        empty = counts == 0  # a class without a training image keeps its random row
        return torch.where(empty.unsqueeze(1), F.normalize(net.heads[0].weight.detach().float(), dim=1), means)

    # -- training ------------------------------------------------------------------------
    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        la = logit_adjusted_loss(out.logits[0].float(), targets, self.class_counts, float(self.opts.tau))
        return LossOutput(la, {"la": la.detach()})


def plain_view_options(cfg: DictConfig, model: nn.Module, in_channels: int) -> Any:
    """The augment options of the class-mean view: the run's normalisation (``data.mean``/``data.std``, else the
    timm model's own where it has one value per image channel, else the data set's, as the engine's
    ``Loaders.augment_options``, :mod:`rayexperts.engine.loaders`) with ``crop_pct`` 1: ``Resize(image_size)`` +
    ``CenterCrop(image_size)``, the code's ``transform_plain``."""
    from rayexperts.data.augment.recipes import AugmentOptions
    from rayexperts.models.backbones import timm_data_config

    d, md = cfg.data, timm_data_config(model) or {}
    mean = std = None
    if d.mean:
        mean, std = tuple(float(v) for v in d.mean), tuple(float(v) for v in d.std)
    elif md and len(md["mean"]) == in_channels:
        mean, std = tuple(float(v) for v in md["mean"]), tuple(float(v) for v in md["std"])
    mode = str(d.interpolation) if d.interpolation != "auto" else str(md.get("interpolation", "bilinear"))
    return AugmentOptions(normalize=str(d.normalize), mean=mean, std=std, crop_pct=1.0,
                          interpolation=mode if mode in ("bilinear", "bicubic") else "bilinear")


def _read_tensor(path: str) -> Tensor:
    """The one tensor in a ``.pt``/``.pth``/``.safetensors`` file (or its only entry)."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            found: Any = load_file(path)
        else:
            found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a tensor file: one line naming it
        raise ConfigError(f"lift.text_features={path}: cannot read it as a tensor file ({type(e).__name__}: {e})") from e
    if isinstance(found, dict):
        if len(found) != 1:
            raise ConfigError(f"lift.text_features={path}: expected one tensor, found keys {sorted(found)[:5]}")
        found = next(iter(found.values()))
    if not isinstance(found, torch.Tensor):
        raise ConfigError(f"lift.text_features={path}: expected a tensor, found {type(found).__name__}")
    return found
