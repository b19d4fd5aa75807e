"""Inference engine. Importing this package is cheap: torch and diffusers load only with ZImageEngine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage_server.engine.source import ModelChoice, resolve_model_source
from zimage_server.engine.spec import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HUB_ID,
    DEFAULT_STEPS,
    GenerationCancelled,
    GenerationSpec,
)

if TYPE_CHECKING:
    from zimage_server.engine.pipeline import ZImageEngine

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_HUB_ID",
    "DEFAULT_STEPS",
    "GenerationCancelled",
    "GenerationSpec",
    "ModelChoice",
    "ZImageEngine",
    "resolve_model_source",
]


def __getattr__(name: str) -> Any:
    if name == "ZImageEngine":
        from zimage_server.engine.pipeline import ZImageEngine

        return ZImageEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
