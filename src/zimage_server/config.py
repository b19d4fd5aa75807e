"""One settings object for the whole service, read from flags, ``ZIMAGE_*`` env vars and defaults."""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".zimage-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    # "auto", "tiny", a local directory or a Hugging Face hub id
    model: str = "auto"
    # Defaults to a SQLite file in the data directory.
    database_url: str | None = None
    # Base of the image URLs handed to clients; defaults to the URL the request came in on.
    public_base_url: str | None = None
    # HMAC key for image URLs; generated once and kept in the data directory when unset.
    url_signing_secret: str | None = None
    signed_url_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)

    # Credits are cents. A new default account gets this much to try the service with.
    default_account_credits: int = Field(default=500, ge=0)
    # Price per generated image, in cents, by canonical model id.
    price_cents_per_image: dict[str, int] = Field(default_factory=lambda: {"z-image-turbo": 1})

    max_prompt_chars: int = Field(default=1000, ge=1, le=1000)
    min_image_side: int = Field(default=256, ge=16)
    max_image_side: int = Field(default=2048, ge=16)
    max_image_pixels: int = Field(default=2048 * 2048, ge=256)
    max_images_per_task: int = Field(default=4, ge=1)
    max_inference_steps: int = Field(default=50, ge=1)

    # How often the worker looks for work when nobody woke it (a submit wakes it at once).
    worker_idle_poll_seconds: float = Field(default=1.0, gt=0)
    # Engine: images per denoising batch (tasks of one size and step count share a batch), attention
    # backend ("auto" or a diffusers backend name), regional compile ("auto" = on CUDA), and memory mode
    # ("low" offloads idle components to the CPU for 16 GB cards).
    max_batch_images: int = Field(default=4, ge=1)
    attention_backend: str = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    memory: Literal["normal", "low"] = "normal"
    prompt_cache_size: int = Field(default=256, ge=0)

    # A worker holds the task it runs for this long and renews the lease every third of it; a task whose
    # lease ran out belongs to a dead worker and is run again, at most max_task_attempts times in all.
    task_lease_seconds: float = Field(default=30.0, gt=0)
    max_task_attempts: int = Field(default=3, ge=1)

    # Limits, checked before anything is reserved or stored.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    rate_limit_per_minute: float = Field(default=120.0, gt=0)
    rate_limit_burst: int = Field(default=30, ge=1)
    max_pending_tasks_per_account: int = Field(default=100, ge=1)
    max_pending_tasks_total: int = Field(default=1000, ge=1)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=3600)
    # Longest a request may hold with `Prefer: wait=N` before answering with the task as it is.
    max_prefer_wait_seconds: float = Field(default=60.0, ge=0)

    # Webhooks: each attempt times out; failures retry with exponential backoff and jitter for hours.
    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    webhook_max_attempts: int = Field(default=20, ge=1)
    webhook_backoff_base_seconds: float = Field(default=5.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_max_age_seconds: float = Field(default=2 * 24 * 3600, gt=0)
    webhook_concurrency: int = Field(default=8, ge=1)
    # CIDR networks that callback URLs may point into although they are private, loopback or link-local
    # (refused by default against SSRF), e.g. ["127.0.0.0/8", "10.0.0.0/8"].
    webhook_allowed_networks: list[str] = Field(default_factory=list)
    # On shutdown, keep sending due webhooks for at most this long.
    shutdown_webhook_flush_seconds: float = Field(default=5.0, ge=0)

    # OpenAI-compatible POST /v1/images/generations answers synchronously; it waits at most this long for
    # its task (then answers 504 with the task id, which the client can keep polling on /v1/tasks/{id}).
    openai_wait_seconds: float = Field(default=300.0, gt=0)

    # Chat passthrough: POST /v1/chat/completions is forwarded to this OpenAI-compatible base URL
    # (e.g. "http://gpu-box:8001/v1"), authenticated there with chat_upstream_api_key. Unset: no chat.
    chat_upstream_url: str | None = None
    chat_upstream_api_key: str | None = None
    # Cents per million tokens, by "prompt" and "completion"; all zero means chat is recorded but free.
    chat_price_cents_per_million_tokens: dict[str, int] = Field(
        default_factory=lambda: {"prompt": 0, "completion": 0}
    )
    # How long a generation may go quiet before the upstream is given up on (long answers stream slowly).
    chat_upstream_timeout_seconds: float = Field(default=600.0, gt=0)
    # Chat bodies carry whole conversations, far larger than an image request: their own, larger limit.
    chat_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("chat_price_cents_per_million_tokens")
    @classmethod
    def _check_chat_prices(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - {"prompt", "completion"}
        if unknown:
            raise ValueError(f"unknown chat price keys {sorted(unknown)}; use 'prompt' and 'completion'")
        if any(price < 0 for price in value.values()):
            raise ValueError("chat prices must not be negative")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'zimage.db'}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @cached_property
    def signing_secret(self) -> bytes:
        if self.url_signing_secret:
            return self.url_signing_secret.encode()
        secret_file = self.data_dir / "url-signing.key"
        if not secret_file.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Written exclusively so two processes starting together cannot pick different secrets.
            try:
                with open(secret_file, "x", encoding="ascii") as handle:
                    handle.write(secrets.token_hex(32))
                secret_file.chmod(0o600)
            except FileExistsError:
                pass
        return secret_file.read_text(encoding="ascii").strip().encode()

    def local_base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
