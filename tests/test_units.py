"""Pure logic: sizes, request validation and the ledger rules, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from zimage_server import accounts, billing
from zimage_server.config import Settings
from zimage_server.db.models import Task
from zimage_server.db.session import Database
from zimage_server.engine.resolutions import ASPECT_RATIO_SIZES, parse_size
from zimage_server.errors import InsufficientCredits, ValidationFailed
from zimage_server.schemas import TextToImageRequest
from zimage_server.tasks import submit, validate_request


def test_aspect_ratio_sizes_are_near_one_megapixel_multiples_of_16() -> None:
    for ratio, (width, height) in ASPECT_RATIO_SIZES.items():
        w, h = (int(part) for part in ratio.split(":"))
        assert width % 16 == 0
        assert height % 16 == 0
        assert abs(width / height - w / h) < 0.01
        assert 0.85e6 < width * height < 1.1e6


@pytest.mark.parametrize(("text", "expected"), [("1024x768", (1024, 768)), (" 512X512 ", (512, 512))])
def test_parse_size(text: str, expected: tuple[int, int]) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1024", "1024x", "x768", "-16x16", "1e3x16", "١٠٢٤x768", "0x16"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_defaults_follow_the_turbo_settings(tmp_path: Path) -> None:
    validated = validate_request(TextToImageRequest(prompt="x"), Settings(data_dir=tmp_path))
    assert validated.params["num_inference_steps"] == 8
    assert validated.params["guidance_scale"] == 0.0
    assert (validated.params["width"], validated.params["height"]) == (1024, 1024)
    assert validated.model_id == "z-image-turbo"
    assert validated.price_cents == 1


def test_limits_come_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_prompt_chars=10, max_image_side=512)
    with pytest.raises(ValidationFailed, match="limit is 10"):
        validate_request(TextToImageRequest(prompt="x" * 11), settings)
    with pytest.raises(ValidationFailed, match="between 256 and 512"):
        validate_request(TextToImageRequest(prompt="x", size="768x512"), settings)
    # Code points, not bytes: ten Chinese characters fit a ten-character limit.
    validate_request(TextToImageRequest(prompt="猫" * 10), settings)


def test_money_moves_are_idempotent_and_balanced(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    db = Database(settings.resolved_database_url)
    db.migrate()
    with db.session() as session:
        account = accounts.create_account(session, "a", credits=3)
        key = accounts.create_key(session, account, "k")
        principal = accounts.Principal(account.id, key.key_id)
        request = validate_request(TextToImageRequest(prompt="x", num_images=2), settings)
        first = submit(session, principal, request, surface="test")
        with pytest.raises(InsufficientCredits):
            submit(session, principal, request, surface="test")
    with db.session() as session:
        assert session.execute(select(func.count()).select_from(Task)).scalar_one() == 1
        assert billing.ledger_sum(session, account.id) == 1
    with db.session() as session:
        task = session.get(Task, first.id)
        assert task is not None
        billing.refund(session, task, "test")
        billing.refund(session, task, "test again")
        assert session.get(type(account), account.id).balance_cents == 3  # type: ignore[union-attr]
        assert billing.ledger_sum(session, account.id) == 3
    db.dispose()


def test_migrations_upgrade_a_database_with_data(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from zimage_server.db.session import MIGRATIONS_DIR

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO accounts (name, email, balance_cents, created_at) VALUES ('a', '', 5, '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO tasks (id, account_id, surface, requested_model, model_id, status, params, price_cents, "
                "image_files, attempts, progress_step, progress_total, created_at) VALUES "
                "('tsk_1', 1, 'runapi', 'z-image', 'z-image-turbo', 'pending', '{}', 1, '[]', 0, 0, 0, '2026-01-01')"
            )
        )
    engine.dispose()
    db = Database(url)
    db.migrate()
    with db.session() as session:
        task = session.get(Task, "tsk_1")
        assert task is not None
        assert task.cancel_requested is False
        # Foreign keys are enforced again after the migration.
        session.add(
            Task(
                id="tsk_2",
                account_id=999,
                surface="x",
                requested_model="m",
                model_id="m",
                params={},
                price_cents=0,
                image_files=[],
            )
        )
        with pytest.raises(Exception, match="FOREIGN KEY"):
            session.flush()
    db.dispose()
