"""The Hermes Agent plugin, inside the real hermes-agent: found by its plugin discovery, and serving its
`image_generate` tool from a live server. Each check runs Hermes in a fresh process with its own
HERMES_HOME, as a user's `hermes` would, so no plugin or config state leaks between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import LiveServer, free_port

CONFIG = """\
plugins:
  enabled: [zimage]
image_gen:
  provider: zimage
  model: z-image-turbo
"""

DISCOVER = """
import json, sys
from hermes_cli.plugins import discover_plugins, get_plugin_manager
from agent.image_gen_registry import get_provider

discover_plugins()
loaded = get_plugin_manager()._plugins["zimage"]
provider = get_provider("zimage")
print(json.dumps({
    "source": loaded.manifest.source,
    "enabled": loaded.enabled,
    "error": loaded.error,
    "class": f"{type(provider).__module__}.{type(provider).__name__}",
    "display_name": provider.display_name,
    "available": provider.is_available(),
    "models": [model["id"] for model in provider.list_models()],
    "default_model": provider.default_model(),
    "setup_env": [var["key"] for var in provider.get_setup_schema()["env_vars"]],
    "torch_loaded": "torch" in sys.modules,
}))
"""

# What `hermes` does at startup (load ~/.hermes/.env), then the agent's own tool dispatch.
IMAGE_GENERATE = """
import json, sys
from hermes_cli.env_loader import load_hermes_dotenv
from model_tools import handle_function_call

load_hermes_dotenv()
print(handle_function_call("image_generate", json.loads(sys.argv[1])))
"""


def hermes(home: Path, script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `script` in a fresh Python with Hermes' home at `home`; return the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ZIMAGE_", "RUNAPI_", "HERMES_"))}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**clean, "HERMES_HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


@pytest.fixture
def hermes_home(tmp_path: Path) -> Path:
    home = tmp_path / "hermes"
    home.mkdir()
    (home / "config.yaml").write_text(CONFIG)
    return home


def test_hermes_discovers_the_plugin_through_its_entry_point(hermes_home: Path) -> None:
    found = hermes(hermes_home, DISCOVER, env={"ZIMAGE_API_KEY": "zimg_x"})
    assert found == {
        "source": "entrypoint",
        "enabled": True,
        "error": None,
        "class": "zimage_server.hermes_plugin.ZImageProvider",
        "display_name": "Z-Image (zimage-server)",
        "available": True,
        "models": ["z-image", "z-image-turbo"],
        "default_model": "z-image",
        "setup_env": ["ZIMAGE_BASE_URL", "ZIMAGE_API_KEY"],
        "torch_loaded": False,
    }
    assert hermes(hermes_home, DISCOVER)["available"] is False  # no key, nothing to call the server with


def test_image_generate_tool_renders_on_the_live_server(
    server: LiveServer, api_key: str, hermes_home: Path
) -> None:
    # Configured as the README says: the key in ~/.hermes/.env, not in the shell.
    (hermes_home / ".env").write_text(f"ZIMAGE_BASE_URL={server.base_url}\nZIMAGE_API_KEY={api_key}\n")
    result = hermes(
        hermes_home, IMAGE_GENERATE, json.dumps({"prompt": "a red fox", "aspect_ratio": "portrait"})
    )
    assert result["success"] is True, result
    assert (result["provider"], result["model"], result["aspect_ratio"]) == (
        "zimage",
        "z-image-turbo",
        "portrait",
    )
    assert result["zimage_aspect_ratio"] == "9:16"
    assert result["cost_cents"] == 1
    # Saved by Hermes' own helper into Hermes' image cache, where its gateways pick images up.
    image = Path(result["image"])
    assert image.parent == hermes_home / "cache" / "images"
    with Image.open(image) as picture:
        assert (picture.format, picture.size) == ("PNG", (720, 1280))
    assert result["task_id"].startswith("tsk_")
    assert result["image_url"].startswith(f"{server.base_url}/files/{result['task_id']}/")


def test_a_server_that_is_down_gives_a_clear_error(hermes_home: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = hermes(
        hermes_home,
        IMAGE_GENERATE,
        json.dumps({"prompt": "a red fox"}),
        env={"ZIMAGE_BASE_URL": down, "ZIMAGE_API_KEY": "zimg_x"},
    )
    assert time.monotonic() - started < 60
    assert result["success"] is False
    assert result["error_type"] == "connection_error"
    assert f"zimage-server at {down} is not reachable" in result["error"]
    assert "zimage serve" in result["error"]


def test_running_out_of_credits_gives_a_clear_error(server: LiveServer, hermes_home: Path) -> None:
    broke = server.create_key(f"hermes-broke-{time.monotonic_ns()}", credits=0)
    result = hermes(
        hermes_home,
        IMAGE_GENERATE,
        json.dumps({"prompt": "a red fox", "aspect_ratio": "square"}),
        env={"ZIMAGE_BASE_URL": server.base_url, "ZIMAGE_API_KEY": broke},
    )
    assert result["success"] is False
    assert result["error_type"] == "insufficient_credits"
    assert result["error"].startswith("Out of credits on zimage-server")
    assert "zimage credits add" in result["error"]
    assert (result["provider"], result["aspect_ratio"]) == ("zimage", "square")


def test_a_missing_api_key_is_reported_before_any_request(hermes_home: Path) -> None:
    result = hermes(hermes_home, IMAGE_GENERATE, json.dumps({"prompt": "a red fox"}))
    assert result["success"] is False
    assert result["error_type"] == "auth_required"
    assert "ZIMAGE_API_KEY is not set" in result["error"]
