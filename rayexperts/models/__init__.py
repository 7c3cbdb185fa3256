"""Backbones, classifier heads and multi-expert models (METHODS.md "Shared building blocks")."""

from rayexperts.models.backbones import BACKBONES, build_backbone, expert_stages
from rayexperts.models.base import Backbone
from rayexperts.models.experts import MultiExpertNet, build_model
from rayexperts.models.heads import CosineClassifier, LinearClassifier, build_classifier
from rayexperts.models.moco import MocoConfig
from rayexperts.models.output import ModelOutput

__all__ = [
    "BACKBONES",
    "Backbone",
    "CosineClassifier",
    "LinearClassifier",
    "ModelOutput",
    "MocoConfig",
    "MultiExpertNet",
    "build_backbone",
    "build_classifier",
    "build_model",
    "expert_stages",
]
