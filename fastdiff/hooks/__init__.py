"""fastdiff.hooks: accelerators attached to diffusers models through `diffusers.hooks.HookRegistry`."""

from fastdiff.hooks.encoder_propagation import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    encoder_propagation,
    remove_encoder_propagation,
)

__all__ = [
    "EncoderPropagationConfig",
    "apply_encoder_propagation",
    "encoder_propagation",
    "remove_encoder_propagation",
]
