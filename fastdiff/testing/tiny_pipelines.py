"""Tiny random-weight Stable Diffusion, SDXL, ControlNet, SD3 and Flux pipelines, built offline from configs.

Real diffusers pipeline classes with seeded, tiny components: a 64x64 image (32x32 latent) in well
under a second on CPU (32x32 for the flow-matching SD3 and Flux fixtures). The CLIP and T5 tokenizers are
written by the code (special tokens, letters, a few words), so plain `prompt` strings work with no hub
access; `prompt_embeds` works too.
"""

from __future__ import annotations

import string

import torch

_WORDS = ("a", "red", "cube", "cat", "dog", "photo", "of", "the", "blue", "sky", "digit", "tree")


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over a vocabulary written here: special tokens, a-z, a</w>-z</w>, a few words."""
    from transformers import CLIPTokenizer

    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # merge each word left to right, so it becomes one token
        if len(word) < 2:
            continue
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            merges.append((piece, right))
            piece = piece + right
            if piece not in tokens:
                tokens.append(piece)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=model_max_length,
    )


def _text_encoder(seed: int, with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77,
        projection_dim=32, hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=32, sample_size=64,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def _sd_unet(seed: int, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=32,
    ).eval()


def tiny_sd_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` with tiny random weights (seeded), DDIM scheduler, 64x64 images."""
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(
        unet=_sd_unet(seed), vae=_vae(seed + 1), text_encoder=_text_encoder(seed + 2),
        tokenizer=tiny_clip_tokenizer(), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A `StableDiffusionXLPipeline` with tiny random weights (two text encoders, text_time embeddings)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=32,
    ).eval()
    return _quiet(StableDiffusionXLPipeline(
        unet=unet, vae=_vae(seed + 1), text_encoder=_text_encoder(seed + 2),
        text_encoder_2=_text_encoder(seed + 3, with_projection=True), tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(), scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    ))


def tiny_controlnet_pipeline(seed: int = 0):
    """A `StableDiffusionControlNetPipeline` with a tiny random ControlNet; pass `image=` a 64x64 control."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(seed + 4)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32), norm_num_groups=32,
    ).eval()
    return _quiet(StableDiffusionControlNetPipeline(
        unet=_sd_unet(seed), controlnet=controlnet, vae=_vae(seed + 1), text_encoder=_text_encoder(seed + 2),
        tokenizer=tiny_clip_tokenizer(), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ))


# ------------------------------------------------------------------------------- flow-matching pipelines
def tiny_t5_tokenizer(model_max_length: int = 32):
    """A T5TokenizerFast over a Unigram vocabulary written here (SentencePiece-style pieces, letters, a few words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase] + [("\u2581" + w, -1.0) for w in _WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _flow_vae(seed: int, latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A `StableDiffusion3Pipeline` with tiny random weights: SD3Transformer2DModel, two CLIP encoders with
    projection, a T5 encoder, FlowMatchEuler scheduler (shift 3, as SD3); 32x32 images (no VAE downsampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    return _quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed + 1, 4),
        text_encoder=_text_encoder(seed + 2, with_projection=True), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_text_encoder(seed + 3, with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed + 4), tokenizer_3=tiny_t5_tokenizer(),
    ))


def tiny_flux_pipeline(seed: int = 0):
    """A `FluxPipeline` with tiny random weights: FluxTransformer2DModel, a CLIP and a T5 encoder, FlowMatchEuler
    scheduler with dynamic shifting (as FLUX.1-dev, so the pipeline passes `mu`); 32x32 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _quiet(FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(seed + 1, 1),
        text_encoder=_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed + 3), tokenizer_2=tiny_t5_tokenizer(),
    ))
