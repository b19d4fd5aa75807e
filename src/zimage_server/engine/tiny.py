"""A tiny, randomly initialised Z-Image pipeline: the real classes at toy sizes.

The weights of the real model cannot be downloaded on every machine (CI, laptops without the hub),
yet the loading path, the API and the tests must run against real diffusers code. This builds the
same five components ``ZImagePipeline`` expects, small enough to render 256x256 in a fraction of a
second on a CPU. Its images are noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Written next to model_index.json so the server can say plainly that it serves random weights.
MARKER_FILE = "zimage_server.json"

# Renders exactly what the Qwen3 template renders for one user turn with enable_thinking=True.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_HIDDEN_SIZE = 32

# A little English and Chinese so the trained merges cover both scripts the API accepts.
_TRAINING_TEXT = [
    "a photo of a cat sitting on a red sofa, soft light, high detail",
    "an astronaut riding a horse on the moon, cinematic, 35mm",
    "a watercolor painting of mountains and a river at sunset",
    "一只猫坐在红色的沙发上，柔和的光线，高清细节",
    "宇航员在月球上骑马，电影感",
    "日落时分山川与河流的水彩画",
]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_pipeline(seed: int = 0) -> Any:
    """Build the tiny pipeline in memory, deterministically for a given ``seed``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    )
    transformer = ZImageTransformer2DModel(
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN_SIZE,
        # Must sum to the head dim (32 / 2); axes_lens stay at the defaults, smaller ones overflow RoPE.
        axes_dims=[4, 6, 6],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline with ``save_pretrained`` so it loads like any model directory."""
    from zimage_server.engine.pipeline import quiet_loading

    quiet_loading()
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(path)
    (path / MARKER_FILE).write_text(
        json.dumps({"kind": "tiny-random", "seed": seed, "note": "random weights: images are noise"}) + "\n"
    )
    return path


def is_tiny_model(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()
