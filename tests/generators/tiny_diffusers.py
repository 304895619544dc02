"""Tiny, randomly initialised diffusers pipelines written to folders, for tests and benchmarks.

The layer sizes follow the scale of diffusers' own fast tests (a few KB of weights per block), so
an SD 1.5 folder is about half a megabyte and a 2-step 64x64 render takes tens of milliseconds on
a CPU. Nothing is downloaded: the CLIP tokenizer's vocabulary and merges are written here. The
pictures are noise, but every code path (tokenizer, text encoder, UNet, scheduler, VAE, LoRA,
ControlNet) is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: every byte gets a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (single characters plus a few merges), saved and reloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(char + "</w>" for char in alphabet)]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_config(**extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        layer_norm_eps=1e-5,
        **extra,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_sd(folder: Path, *, seed: int = 0) -> Path:
    """An SD 1.5-shaped pipeline (StableDiffusionPipeline) saved to ``folder``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=write_tokenizer(folder / "_tokenizer"),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline (two text encoders, time-id conditioning) saved to ``folder``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,  # six time ids + pooled text
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states side by side
        norm_num_groups=4,
    )
    tokenizer = write_tokenizer(folder / "_tokenizer")
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_WIDTH)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def build_controlnet(sd_folder: Path, folder: Path) -> Path:
    """A ControlNet shaped like ``sd_folder``'s UNet (random weights, as a depth ControlNet)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet", local_files_only=True)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(folder)
    return folder


def build_lora(sd_folder: Path, path: Path, *, rank: int = 2) -> Path:
    """A LoRA for ``sd_folder``'s UNet attention layers, as a .safetensors file at ``path``."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = get_peft_model_state_dict(unet)
    for tensor in state.values():  # peft starts B at zero (a no-op LoRA): make it change the image
        torch.nn.init.normal_(tensor, std=0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=state, weight_name=path.name)
    return path


def write_t5_tokenizer(folder: Path) -> Any:
    """A T5 tokenizer (a unigram model over single characters) built with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(code), -2.0) for code in range(ord("!"), ord("~") + 1)]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_flux(folder: Path, *, seed: int = 0) -> Path:
    """A FLUX-shaped pipeline (CLIP and T5 text encoders, a flow-matching transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        axes_dims_rope=[4, 4, 8],
    )
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=t5,
        tokenizer=write_tokenizer(folder / "_tokenizer"),
        tokenizer_2=write_t5_tokenizer(folder / "_t5_tokenizer"),
        transformer=transformer,
        vae=vae,
    )
    pipe.save_pretrained(folder)
    return folder
