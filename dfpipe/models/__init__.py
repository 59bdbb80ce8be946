"""Backbones with offline pretrained weights, and the expert (real/fake classifier) registry."""

from .pretrained import (
    BUNDLED,
    PRETRAINED_MODES,
    WeightsUnavailableError,
    bundled_checkpoint,
    convert_state_dict,
    create_backbone,
    default_cache_dir,
    normalization,
)
from .registry import (
    CHECKPOINT_FORMAT,
    EXPERTS,
    Expert,
    Registry,
    build_expert,
    expert_from_description,
    trainable_parameters,
)

__all__ = [
    "BUNDLED",
    "CHECKPOINT_FORMAT",
    "EXPERTS",
    "PRETRAINED_MODES",
    "Expert",
    "Registry",
    "WeightsUnavailableError",
    "build_expert",
    "bundled_checkpoint",
    "convert_state_dict",
    "create_backbone",
    "default_cache_dir",
    "expert_from_description",
    "normalization",
    "trainable_parameters",
]
