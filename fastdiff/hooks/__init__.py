"""fastdiff.hooks: accelerators attached to diffusers models through `diffusers.hooks.HookRegistry`."""

from fastdiff.hooks.block_skip import (
    BlockSkipConfig,
    apply_block_skip,
    block_skip,
    remove_block_skip,
    skippable_layers,
)
from fastdiff.hooks.calibrate import calibrate_key_steps
from fastdiff.hooks.encoder_propagation import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    decoder_layers,
    encoder_layers,
    encoder_propagation,
    remove_encoder_propagation,
)

__all__ = [
    "BlockSkipConfig",
    "EncoderPropagationConfig",
    "apply_block_skip",
    "apply_encoder_propagation",
    "block_skip",
    "calibrate_key_steps",
    "decoder_layers",
    "encoder_propagation",
    "encoder_layers",
    "remove_block_skip",
    "remove_encoder_propagation",
    "skippable_layers",
]
