"""Backbones, classifier heads, multi-expert models and the MoCo branch (docs/methods.md "Shared building
blocks"); ``python -m rayexperts.models summary`` prints the model a config builds.

Names are imported on first use (PEP 562): ``import rayexperts.models`` costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Backbone": "base", "BackboneEntry": "base", "PooledStages": "base",
    "build_backbone": "backbones", "expert_stages": "backbones", "load_weights": "backbones",
    "MultiExpertNet": "experts", "build_experts": "experts", "find_experts": "experts",
    "CosineClassifier": "heads", "L2Normalize": "heads", "LinearClassifier": "heads", "WithExtraHeads": "heads", "build_classifier": "heads",
    "ContrastiveOutput": "moco", "MocoBranch": "moco", "MocoConfig": "moco", "MocoExperts": "moco",
    "ModelOutput": "output",
}
__all__ = [
    "Backbone",
    "BackboneEntry",
    "ContrastiveOutput",
    "CosineClassifier",
    "L2Normalize",
    "LinearClassifier",
    "MocoBranch",
    "MocoConfig",
    "MocoExperts",
    "ModelOutput",
    "MultiExpertNet",
    "PooledStages",
    "WithExtraHeads",
    "build_backbone",
    "build_classifier",
    "build_experts",
    "expert_stages",
    "find_experts",
    "load_weights",
]

if TYPE_CHECKING:
    from rayexperts.models.backbones import build_backbone, expert_stages, load_weights
    from rayexperts.models.base import Backbone, BackboneEntry, PooledStages
    from rayexperts.models.experts import MultiExpertNet, build_experts, find_experts
    from rayexperts.models.heads import CosineClassifier, L2Normalize, LinearClassifier, WithExtraHeads, build_classifier
    from rayexperts.models.moco import ContrastiveOutput, MocoBranch, MocoConfig, MocoExperts
    from rayexperts.models.output import ModelOutput


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"rayexperts.models.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rayexperts.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
