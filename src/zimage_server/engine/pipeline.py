"""The inference engine: diffusers' ``ZImagePipeline`` with the Turbo settings and lean prompt encoding."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL.Image import Image

from zimage_server.engine.spec import MAX_SEQUENCE_LENGTH, GenerationCancelled, GenerationSpec

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], bool]
"""Called after each denoising step with ``(step, total)``; returning False cancels the generation."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what the model was trained in; CPUs run it slowly or not at all, so they get float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quiet_loading() -> None:
    """Loading-bar output would interleave with the server's logs; the log line above says enough."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class ZImageEngine:
    def __init__(self, pipeline: Any, *, source: str, random_weights: bool = False) -> None:
        self.pipeline = pipeline
        self.source = source
        self.random_weights = random_weights
        self.device: torch.device = pipeline.transformer.device
        self.dtype: torch.dtype = pipeline.transformer.dtype
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        random_weights: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ZImageEngine:
        """Load a pipeline with ``from_pretrained`` from a local directory or a hub id."""
        from diffusers import ZImagePipeline

        quiet_loading()
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        log.info("loading %s on %s in %s", source, device, dtype)
        pipeline = ZImagePipeline.from_pretrained(str(source), dtype=dtype)
        pipeline.to(device)
        return cls(pipeline, source=str(source), random_weights=random_weights)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "random_weights": self.random_weights,
        }

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Text embeddings exactly as the stock pipeline computes them, without its 512-token padding.

        The stock pipeline pads every prompt to 512 tokens; the text encoder is causal and masked, so the
        padding changes nothing in the kept embeddings but costs a 512-token forward pass. Padding to the
        longest prompt of the batch gives the same embeddings for a fraction of the work.
        """
        tokenizer = self.pipeline.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]
        inputs = tokenizer(
            texts, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        )
        input_ids = inputs.input_ids.to(self.device)
        mask = inputs.attention_mask.to(self.device).bool()
        hidden = self.pipeline.text_encoder(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def generate(self, spec: GenerationSpec, on_step: OnStep | None = None) -> list[Image]:
        """Render ``spec.num_images`` images; image ``i`` is the batch-of-one image for seed ``seed + i``."""
        prompt_embeds = self.encode_prompts([spec.prompt])
        negative_embeds = self.encode_prompts([spec.negative_prompt or ""]) if spec.uses_cfg else None
        generators = [
            torch.Generator(device=self.device).manual_seed(spec.seed + index)
            for index in range(spec.num_images)
        ]
        total = spec.num_inference_steps

        def step_end(_pipeline: Any, index: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
            # Raising here leaves the pipeline before the next transformer call: that is the cancellation.
            if on_step is not None and not on_step(index + 1, total):
                raise GenerationCancelled(index + 1, total)
            return {}

        output = self.pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_images_per_prompt=spec.num_images,
            height=spec.height,
            width=spec.width,
            num_inference_steps=total,
            guidance_scale=spec.guidance_scale,
            generator=generators,
            callback_on_step_end=step_end,
            output_type="pil",
        )
        return list(output.images)
