"""Hermes Agent image generation backend `zimage`: Hermes' `image_generate` tool, served by a zimage-server.

Installed with zimage-server, it registers through the `hermes_agent.plugins` entry point. Enable it in
`~/.hermes/config.yaml`::

    plugins:
      enabled: [zimage]
    image_gen:
      provider: zimage
      model: z-image            # optional; or z-image-turbo (the same weights)
      zimage:                   # optional
        base_url: http://127.0.0.1:8000
        timeout: 600

and put `ZIMAGE_API_KEY` (and `ZIMAGE_BASE_URL` if the server is elsewhere) in `~/.hermes/.env`.
Environment variables win over config.yaml, as with Hermes' own backends.

This module is imported only by Hermes, which provides `agent` and `hermes_cli`; it talks to the server
through `zimage_server.client`, so it pulls in neither torch nor any server code.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.image_gen_provider import (
    DEFAULT_ASPECT_RATIO,
    ImageGenProvider,
    error_response,
    resolve_aspect_ratio,
    save_url_image,
    success_response,
)

from zimage_server.client import (
    DEFAULT_BASE_URL,
    AuthenticationError,
    InsufficientCreditsError,
    RateLimitError,
    ServiceUnavailableError,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
    ZImage,
    ZImageError,
)
from zimage_server.client import ConnectionError as UnreachableError

logger = logging.getLogger(__name__)

PROVIDER = "zimage"

# Hermes speaks in three shapes; these are the server's matching aspect ratios.
ASPECT_RATIOS = {"landscape": "16:9", "square": "1:1", "portrait": "9:16"}

MODELS: dict[str, dict[str, str]] = {
    "z-image": {
        "display": "Z-Image (RunAPI name)",
        "speed": "~2-10s on a GPU",
        "strengths": "Photorealism, Chinese and English text in images; 8-step Turbo schedule.",
        "price": "1 credit (cent) per image, set by the server",
    },
    "z-image-turbo": {
        "display": "Z-Image-Turbo",
        "speed": "~2-10s on a GPU",
        "strengths": "The same Z-Image-Turbo weights under their own name.",
        "price": "1 credit (cent) per image, set by the server",
    },
}
DEFAULT_MODEL = "z-image"
DEFAULT_TIMEOUT = 600.0


def _config() -> dict[str, Any]:
    """`image_gen.zimage` from Hermes' config.yaml; empty when absent or unreadable."""
    try:
        from hermes_cli.config import load_config

        section = load_config().get("image_gen")
        ours = section.get(PROVIDER) if isinstance(section, dict) else None
        return ours if isinstance(ours, dict) else {}
    except Exception as exc:  # a broken config must not break the tool; fall back to defaults
        logger.debug("could not read image_gen.zimage from config: %s", exc)
        return {}


def _base_url() -> str:
    configured = _config().get("base_url")
    return (
        os.environ.get("ZIMAGE_BASE_URL")
        or (configured if isinstance(configured, str) and configured.strip() else None)
        or DEFAULT_BASE_URL
    )


def _api_key() -> str | None:
    return os.environ.get("ZIMAGE_API_KEY") or os.environ.get("RUNAPI_API_KEY") or None


def _timeout() -> float:
    value = _config().get("timeout")
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_TIMEOUT


def _model(requested: Any) -> str:
    # Hermes passes `image_gen.model` along, which may name another backend's model: ignore those.
    if isinstance(requested, str) and requested.strip() in MODELS:
        return requested.strip()
    return DEFAULT_MODEL


class ZImageProvider(ImageGenProvider):  # type: ignore[misc]  # Hermes ships no type information
    """Text-to-image through a zimage-server: submit, poll, and save the image in Hermes' image cache."""

    @property
    def name(self) -> str:
        return PROVIDER

    @property
    def display_name(self) -> str:
        return "Z-Image (zimage-server)"

    def is_available(self) -> bool:
        return _api_key() is not None

    def list_models(self) -> list[dict[str, Any]]:
        return [{"id": model_id, **meta} for model_id, meta in MODELS.items()]

    def default_model(self) -> str:
        return DEFAULT_MODEL

    def get_setup_schema(self) -> dict[str, Any]:
        return {
            "name": "Z-Image (self-hosted zimage-server)",
            "badge": "self-hosted",
            "tag": "Z-Image-Turbo on your own GPU box via zimage-server; paid from its credit balance.",
            "env_vars": [
                {
                    "key": "ZIMAGE_BASE_URL",
                    "prompt": "zimage-server URL",
                    "default": DEFAULT_BASE_URL,
                },
                {
                    "key": "ZIMAGE_API_KEY",
                    "prompt": "zimage-server API key (zimg_...; `zimage keys create --name hermes`)",
                },
            ],
        }

    def capabilities(self) -> dict[str, Any]:
        return {"modalities": ["text"], "max_reference_images": 0}

    def generate(
        self,
        prompt: str,
        aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        *,
        image_url: str | None = None,
        reference_image_urls: list[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        prompt = (prompt or "").strip()
        aspect = resolve_aspect_ratio(aspect_ratio)
        model = _model(kwargs.get("model"))
        base_url = _base_url()

        def failure(error: str, error_type: str) -> dict[str, Any]:
            result: dict[str, Any] = error_response(
                error=error,
                error_type=error_type,
                provider=PROVIDER,
                model=model,
                prompt=prompt,
                aspect_ratio=aspect,
            )
            return result

        if not prompt:
            return failure("Prompt is required and must be a non-empty string", "invalid_argument")
        if image_url or reference_image_urls:
            return failure(
                "zimage-server does text-to-image only; call image_generate without image_url",
                "modality_unsupported",
            )
        key = _api_key()
        if key is None:
            return failure(
                "ZIMAGE_API_KEY is not set. Create a key on the server with "
                "`zimage keys create --name hermes --credits 500` and put it in ~/.hermes/.env "
                "(or run `hermes tools` -> Image Generation -> Z-Image).",
                "auth_required",
            )

        try:
            with ZImage(base_url=base_url, api_key=key, timeout=30) as client:
                task = client.run(prompt, timeout=_timeout(), model=model, aspect_ratio=ASPECT_RATIOS[aspect])
        except UnreachableError as exc:
            return failure(
                f"zimage-server at {base_url} is not reachable ({exc.message}). Start it with "
                "`zimage serve` (or `scripts/run`), or point ZIMAGE_BASE_URL at it.",
                "connection_error",
            )
        except InsufficientCreditsError as exc:
            return failure(
                f"Out of credits on zimage-server: {exc.message}. Add some with "
                "`zimage credits add <account> <cents>` on the server.",
                "insufficient_credits",
            )
        except AuthenticationError as exc:
            return failure(
                f"zimage-server refused the API key ({exc.code}): {exc.message}. Check ZIMAGE_API_KEY.",
                "auth_required",
            )
        except (RateLimitError, ServiceUnavailableError) as exc:
            wait = f" Try again in {exc.retry_after:g}s." if exc.retry_after else ""
            return failure(f"zimage-server is busy ({exc.code}): {exc.message}.{wait}", "rate_limited")
        except ValidationError as exc:
            return failure(f"zimage-server refused the request: {exc.message}", "invalid_argument")
        except TaskFailedError as exc:
            return failure(f"Image generation failed: {exc.task.error or exc.code}", "generation_failed")
        except TaskTimeoutError as exc:
            return failure(
                f"Task {exc.task.id} still {exc.task.status} after {exc.timeout:g}s; "
                "raise image_gen.zimage.timeout for a slow server.",
                "timeout",
            )
        except ZImageError as exc:
            return failure(f"zimage-server error: {exc}", "api_error")

        image = task.images[0]
        try:
            saved = str(save_url_image(image.url, prefix=f"zimage_{model}"))
        except Exception as exc:  # the signed URL stays valid for days: hand it over instead
            logger.warning("could not cache %s (%s); returning the URL", image.url, exc)
            saved = image.url
        result: dict[str, Any] = success_response(
            image=saved,
            model=model,
            prompt=prompt,
            aspect_ratio=aspect,
            provider=PROVIDER,
            extra={
                "task_id": task.id,
                "image_url": image.url,
                "seed": image.seed if image.seed is not None else task.seed,
                "width": image.width,
                "height": image.height,
                "zimage_aspect_ratio": ASPECT_RATIOS[aspect],
                "cost_cents": task.usage.cost_cents if task.usage else None,
            },
        )
        return result


def register(ctx: Any) -> None:
    """Hermes' plugin entry point."""
    ctx.register_image_gen_provider(ZImageProvider())
