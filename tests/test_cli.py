"""The `zimage` command: admin commands on a data directory, and `generate` against a live server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from tests.conftest import LiveServer
from zimage_server.cli import app

runner = CliRunner()


def zimage(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_keys_and_credits_on_a_data_directory(tmp_path: Path) -> None:
    data = str(tmp_path / "fresh")  # does not exist yet: the command creates and migrates it
    created = json.loads(
        zimage("keys", "create", "--name", "alice", "--credits", "250", "--json", "--data-dir", data)
    )
    assert created["key"].startswith("zimg_")
    assert created["balance_cents"] == 250
    second = json.loads(
        zimage("keys", "create", "--name", "alice-laptop", "--account", "alice", "--json", "--data-dir", data)
    )
    assert second["account_id"] == created["account_id"]
    assert second["key"] != created["key"]

    listed = json.loads(zimage("keys", "list", "--json", "--data-dir", data))
    assert [row["name"] for row in listed] == ["alice", "alice-laptop"]
    assert all(created["key"] not in json.dumps(row) for row in listed)  # only prefixes are kept

    zimage("keys", "revoke", str(second["key_id"]), "--data-dir", data)
    assert [row["revoked"] for row in json.loads(zimage("keys", "list", "--json", "--data-dir", data))] == [
        False,
        True,
    ]

    added = json.loads(zimage("credits", "add", "alice", "50", "--json", "--data-dir", data))
    assert added["balance_cents"] == 300
    bonus = json.loads(
        zimage("credits", "add", str(created["account_id"]), "20", "--bonus", "--json", "--data-dir", data)
    )
    assert bonus["bonus_balance_cents"] == 20
    assert bonus["paid_balance_cents"] == 300
    shown = json.loads(zimage("credits", "show", "alice", "--json", "--data-dir", data))
    assert shown["balance_cents"] == 320
    assert "alice" in zimage("credits", "show", "alice", "--data-dir", data)

    secret = json.loads(zimage("keys", "webhook-secret", "alice", "--json", "--data-dir", data))["secret"]
    assert secret.startswith("whsec_")
    assert (
        json.loads(zimage("keys", "webhook-secret", "alice", "--json", "--data-dir", data))["secret"]
        == secret
    )
    rotated = json.loads(zimage("keys", "webhook-secret", "alice", "--rotate", "--json", "--data-dir", data))
    assert rotated["secret"] != secret

    missing = runner.invoke(app, ["credits", "show", "nobody", "--data-dir", data])
    assert missing.exit_code == 1
    assert "no account" in missing.output


def test_data_dir_comes_from_the_environment(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["keys", "create", "--name", "env", "--json"], env={"ZIMAGE_DATA_DIR": str(tmp_path / "env")}
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env" / "zimage.db").is_file()


def test_generate_against_a_live_server(server: LiveServer, api_key: str, tmp_path: Path) -> None:
    output = tmp_path / "cat.webp"
    result = runner.invoke(
        app,
        [
            "generate",
            "一只猫",
            "-o",
            str(output),
            "--size",
            "256x256",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--seed",
            "9",
        ],
        env={"ZIMAGE_BASE_URL": server.base_url, "ZIMAGE_API_KEY": api_key},
    )
    assert result.exit_code == 0, result.output
    assert Image.open(output).format == "WEBP"
    assert Image.open(output).size == (256, 256)
    assert (tmp_path / "cat-1.webp").is_file()
    assert "seed 9" in result.output
    assert "seed 10" in result.output


def test_generate_reports_server_errors(server: LiveServer, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "x",
            "-o",
            str(tmp_path / "x.png"),
            "--base-url",
            server.base_url,
            "--api-key",
            "zimg_bad",
        ],
    )
    assert result.exit_code == 1
    assert "invalid_api_key" in result.output


def test_tiny_model_command_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    # Through the console entry point, as a user types it.
    subprocess.run([sys.executable, "-m", "zimage_server", "tiny-model", str(tmp_path / "tiny")], check=True)
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert (tmp_path / "tiny" / "zimage_server.json").is_file()
