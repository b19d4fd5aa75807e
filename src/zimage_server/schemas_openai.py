"""Wire models of the OpenAI-compatible surface: the Images API body and answer, and chat usage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage_server.schemas import OutputFormat


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`, as the official `openai` package sends it, plus Z-Image's own knobs.

    The official client sends only the fields a caller passes, so anything else (`quality`, `style`,
    `user`...) is refused by name instead of being silently ignored.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="`z-image` (default) or `z-image-turbo`.")
    prompt: str = Field(description="What to draw, 1-1000 characters, Chinese or English.")
    n: int | None = Field(default=None, ge=1, description="Images to generate (at most 4 by default).")
    size: str | None = Field(
        default=None, description='"WIDTHxHEIGHT" (multiples of 16) or "auto" (1024x1024).'
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="`url` (default): signed URLs; `b64_json`: the image bytes inline."
    )
    output_format: OutputFormat | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Image i uses seed+i.")
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=20)


class GeneratedImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the images were made.")
    data: list[GeneratedImage]
    output_format: OutputFormat
    size: str
    # Extensions: where the result lives on this server, and how to reproduce it.
    task_id: str
    seed: int
