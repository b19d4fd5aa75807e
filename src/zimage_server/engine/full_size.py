"""The full-size Z-Image-Turbo architecture with random weights, for measuring speed without the weights.

Random weights cost exactly the compute of the real ones. The published component configs ship with
the package (``configs/*.json``); the modules are allocated straight on the target device in the target
dtype, so a GPU box does not spend minutes initialising 12 GB of weights on the CPU first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def published_config(component: str) -> dict[str, Any]:
    """One component's published config, without the ``_class_name`` bookkeeping key."""
    config: dict[str, Any] = json.loads((CONFIG_DIR / f"{component}.json").read_text())
    config.pop("_class_name", None)
    return config


@contextmanager
def allocate_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_components(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """transformer, text_encoder and vae at full size with random weights, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with allocate_on(device, dtype):
        transformer = ZImageTransformer2DModel(**published_config("transformer"))
        text_encoder = Qwen3Model(Qwen3Config(**published_config("text_encoder")))
        vae = AutoencoderKL(**published_config("vae"))
    modules: tuple[Any, ...] = (transformer, text_encoder, vae)
    for module in modules:
        module.eval().requires_grad_(False)
    return {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}


def build_full_size_pipeline(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ``ZImagePipeline`` of the full-size architecture with random weights.

    The tokenizer is the tiny model's byte-level BPE (the Qwen tokenizer cannot be downloaded here): its
    ids are valid for the 151,936-token embedding, and prompts tokenize to a similar length, which is
    all that matters for the compute.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from zimage_server.engine.tiny import build_tokenizer

    components = build_components(device, dtype)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**published_config("scheduler")),
        tokenizer=build_tokenizer(),
        **components,
    )
