"""Floating-point operations of one generation, counted from the architecture itself.

Each component is instantiated on PyTorch's meta device (no memory, no compute) and run once under
``FlopCounterMode``, which adds up the matrix products, convolutions and attention the real run would
do: linear layers, attention, the refiners, the text encoder and the VAE decoder, at the actual sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from zimage_server.engine.full_size import allocate_on


@dataclass(frozen=True)
class GenerationFlops:
    text_encoder: float
    transformer_per_step: float
    transformer: float
    vae_decode: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _count(run: Any) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def count_generation_flops(
    configs: dict[str, dict[str, Any]],
    *,
    width: int,
    height: int,
    prompt_tokens: int,
    steps: int,
    images: int = 1,
    cfg: bool = False,
) -> GenerationFlops:
    """FLOPs of ``images`` images of one prompt; ``configs`` holds the transformer, text_encoder and vae
    configs (as their modules' ``.config`` or the published JSON)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    meta = torch.device("meta")
    dtype = torch.bfloat16
    with allocate_on(meta, dtype):
        transformer: Any = ZImageTransformer2DModel(**_init_args(configs["transformer"]))
        text_encoder = Qwen3Model(Qwen3Config(**_init_args(configs["text_encoder"])))
        vae: Any = AutoencoderKL(**_init_args(configs["vae"]))

    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_h, latent_w = height // scale, width // scale
    channels = int(transformer.config.in_channels)
    passes = 2 if cfg else 1
    tokens = torch.zeros(1, prompt_tokens, dtype=torch.long, device=meta)
    text = _count(lambda: text_encoder(input_ids=tokens, output_hidden_states=True)) * (2 if cfg else 1)
    latents = [
        torch.empty(channels, 1, latent_h, latent_w, dtype=dtype, device=meta) for _ in range(images * passes)
    ]
    captions = [
        torch.empty(prompt_tokens, int(transformer.config.cap_feat_dim), dtype=dtype, device=meta)
        for _ in range(images * passes)
    ]
    timestep = torch.full((images * passes,), 0.5, device=meta)
    per_step = _count(lambda: transformer(latents, timestep, captions, return_dict=False))
    decode_input = torch.empty(images, channels, latent_h, latent_w, dtype=dtype, device=meta)
    vae_decode = _count(lambda: vae.decode(decode_input, return_dict=False))
    total = text + per_step * steps + vae_decode
    return GenerationFlops(text, per_step, per_step * steps, vae_decode, total)


def _init_args(config: Any) -> dict[str, Any]:
    values = dict(config)
    for private in [key for key in values if key.startswith("_")]:
        values.pop(private)
    for bookkeeping in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        values.pop(bookkeeping, None)
    return values


# Dense bf16 tensor-core peaks from the datasheets, by a substring of the CUDA device name.
DATASHEET_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "H20": 148e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "RTX 4090": 165e12,
    "A10": 125e12,
}


def datasheet_peak(device_name: str) -> float | None:
    for name, flops in DATASHEET_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None
