"""What one generation request asks of the engine, and the Turbo sampling defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_HUB_ID = "Tongyi-MAI/Z-Image-Turbo"

# Since diffusers 0.39 the Z-Image sigmas are linspace(1, 1/N, N), so 8 steps are 8 transformer calls:
# the model card's schedule (its "9 steps" was written for older diffusers, whose last call was wasted).
DEFAULT_STEPS = 8
# Turbo is distilled for guidance 0: one transformer pass per step and no use for a negative prompt.
# The pipeline's own default (5.0) would silently turn on CFG and double the cost.
DEFAULT_GUIDANCE_SCALE = 0.0

MAX_NUM_IMAGES = 4
# The stock pipeline's max_sequence_length; longer prompts are truncated to it.
MAX_SEQUENCE_LENGTH = 512
# torch.Generator.manual_seed takes at most an unsigned 64-bit value, and image i uses seed + i.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class GenerationSpec:
    """One text-to-image request: ``num_images`` images of one prompt, image ``i`` seeded with ``seed + i``.

    Seeding each image separately makes every image of a batch reproducible on its own.
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    seed: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:
            raise ValueError(f"num_images must be between 1 and {MAX_NUM_IMAGES}, got {self.num_images}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.seed < 0 or self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED - self.num_images + 1}, got {self.seed}")

    @property
    def uses_cfg(self) -> bool:
        # The pipeline's own rule since diffusers 0.37: any guidance above 0 runs classifier-free guidance.
        return self.guidance_scale > 0


class GenerationCancelled(Exception):
    """Raised out of :meth:`ZImageEngine.generate` when ``on_step`` asked to stop; no image is returned."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"generation cancelled after step {step} of {total}")
        self.step = step
        self.total = total


def spec_from_params(params: dict[str, Any]) -> GenerationSpec:
    """The engine's view of a task's stored, validated parameters."""
    return GenerationSpec(
        prompt=params["prompt"],
        negative_prompt=params.get("negative_prompt"),
        width=params["width"],
        height=params["height"],
        num_images=params["num_images"],
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        seed=params["seed"],
    )


def batch_key(spec: GenerationSpec) -> tuple[int, int, int, float]:
    """Specs with equal keys can share one denoising batch."""
    return (spec.width, spec.height, spec.num_inference_steps, spec.guidance_scale)
