"""The models this server offers and the names clients may use for them."""

from __future__ import annotations

from dataclasses import dataclass

SERVICE = "z_image"
TEXT_TO_IMAGE = "text_to_image"


@dataclass(frozen=True)
class CatalogModel:
    id: str
    description: str
    aliases: tuple[str, ...]


TURBO = CatalogModel(
    id="z-image-turbo",
    description="Z-Image-Turbo (6B, 8-step distilled text-to-image, Chinese and English prompts)",
    # "z-image" is the name RunAPI clients send for the default Z-Image model.
    aliases=("z-image",),
)

CATALOG: tuple[CatalogModel, ...] = (TURBO,)
DEFAULT_MODEL_NAME = "z-image"

_BY_NAME: dict[str, CatalogModel] = {name: model for model in CATALOG for name in (model.id, *model.aliases)}


def public_model_names() -> list[str]:
    return sorted(_BY_NAME)


def lookup_model(name: str) -> CatalogModel | None:
    return _BY_NAME.get(name.strip().lower())
