"""One settings object for the whole service, read from flags, ``ZIMAGE_*`` env vars and defaults."""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path

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

    max_prompt_chars: int = Field(default=1000, ge=1)
    min_image_side: int = Field(default=256, ge=16)
    max_image_side: int = Field(default=2048, ge=16)
    max_image_pixels: int = Field(default=2048 * 2048, ge=256)
    max_images_per_task: int = Field(default=4, ge=1)
    max_inference_steps: int = Field(default=50, ge=1)

    # How often the worker looks for work when nobody woke it (a submit wakes it at once).
    worker_idle_poll_seconds: float = Field(default=1.0, gt=0)

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

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
