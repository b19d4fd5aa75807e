"""Which weights `--model` means: a local directory, a hub id, or the tiny random pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zimage_server.engine.spec import DEFAULT_HUB_ID
from zimage_server.engine.tiny import is_tiny_model, save_tiny_model

AUTO = "auto"
TINY = "tiny"
# The full-size architecture with random weights: real compute without the weights, for load tests.
FULL_RANDOM = "full-random"
TINY_DIR_NAME = "tiny-random"


@dataclass(frozen=True)
class ModelChoice:
    source: str
    """What ``from_pretrained`` receives: a local directory or a hub id."""
    reason: str
    """Why this one was chosen, for the startup banner."""
    random_weights: bool
    """True for the tiny pipeline: its images are noise, and every surface must say so."""


def _hub_weights_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(hub_id, "model_index.json"), str)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def tiny_model_choice(models_dir: Path, reason: str) -> ModelChoice:
    path = models_dir / TINY_DIR_NAME
    if not (path / "model_index.json").is_file():
        save_tiny_model(path)
    return ModelChoice(source=str(path), reason=reason, random_weights=True)


def resolve_model_source(model: str, models_dir: Path) -> ModelChoice:
    """Map the ``--model`` setting to weights.

    ``auto`` serves the real Z-Image-Turbo when its weights are on disk (under the data directory or in
    the Hugging Face cache) or when a CUDA GPU is present (it is then downloaded), and otherwise the tiny
    random pipeline, so that the service runs anywhere and says which one it is.
    """
    if model == TINY:
        return tiny_model_choice(models_dir, "asked for the tiny random model")
    if model == FULL_RANDOM:
        return ModelChoice(FULL_RANDOM, "full-size Z-Image-Turbo architecture with random weights", True)
    if model != AUTO:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise ValueError(f"{path} is not a diffusers pipeline directory: it has no model_index.json")
            return ModelChoice(str(path.resolve()), "local directory given with --model", is_tiny_model(path))
        return ModelChoice(model, "hub id given with --model", random_weights=False)
    local = models_dir / DEFAULT_HUB_ID.split("/")[-1]
    if (local / "model_index.json").is_file():
        return ModelChoice(str(local), f"weights found in {local}", random_weights=False)
    if _hub_weights_cached(DEFAULT_HUB_ID):
        return ModelChoice(DEFAULT_HUB_ID, "weights found in the Hugging Face cache", random_weights=False)
    if _cuda_available():
        return ModelChoice(DEFAULT_HUB_ID, "a CUDA GPU is present", random_weights=False)
    return tiny_model_choice(
        models_dir,
        "no CUDA GPU and no local Z-Image-Turbo weights: serving a tiny randomly initialised pipeline "
        "whose images are noise (pass --model PATH_OR_HUB_ID for real weights)",
    )
