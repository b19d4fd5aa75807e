"""`zimage mcp` driven by the `mcp` package's own client, against a live zimage server."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image

from tests.conftest import LiveServer, free_port

TOOLS = {"text_to_image", "get_task", "cancel_task", "check_balance", "list_models"}


@asynccontextmanager
async def stdio_session(server: LiveServer, key: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "zimage_server", "mcp"],
        env={"ZIMAGE_BASE_URL": server.base_url, "ZIMAGE_API_KEY": key},
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def texts(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def run_async(test: Any) -> None:
    anyio.run(test)


def test_stdio_tools_generate_and_account(server: LiveServer, api_key: str) -> None:
    async def scenario() -> None:
        async with stdio_session(server, api_key) as session:
            listed = await session.list_tools()
            assert {tool.name for tool in listed.tools} == TOOLS
            schema = next(tool for tool in listed.tools if tool.name == "text_to_image").input_schema
            assert schema["required"] == ["prompt"]

            result = await session.call_tool(
                "text_to_image", {"prompt": "一只猫", "size": "256x256", "seed": 5, "num_images": 2}
            )
            assert not result.is_error, texts(result)
            images = [block for block in result.content if isinstance(block, ImageContent)]
            assert len(images) == 2
            assert all(block.mime_type == "image/png" for block in images)
            decoded = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
            assert (decoded.format, decoded.size) == ("PNG", (256, 256))
            summary = texts(result)
            assert "completed" in summary
            urls = [line.split(": ", 1)[1] for line in summary.splitlines() if line.startswith("image ")]
            assert len(urls) == 2
            async with httpx.AsyncClient(timeout=30) as http:
                assert (await http.get(urls[1])).status_code == 200
            task_id = summary.split()[1].rstrip(":")

            fetched = await session.call_tool("get_task", {"task_id": task_id})
            assert not fetched.is_error
            assert '"status": "completed"' in texts(fetched)

            balance = await session.call_tool("check_balance", {})
            assert not balance.is_error
            assert "balance: 98 cents" in texts(balance)

            models = await session.call_tool("list_models", {})
            assert texts(models).splitlines()[0].startswith("z-image:")
            assert "tiny random weights" in texts(models)

    run_async(scenario)


def test_stdio_errors_come_back_as_tool_errors(server: LiveServer, api_key: str) -> None:
    async def scenario() -> None:
        async with stdio_session(server, api_key) as session:
            bad_size = await session.call_tool("text_to_image", {"prompt": "x", "size": "1000x1000"})
            assert bad_size.is_error
            assert "422" in texts(bad_size)
            assert "multiples of 16" in texts(bad_size)

            missing = await session.call_tool("get_task", {"task_id": "tsk_" + "0" * 32})
            assert missing.is_error
            assert "task_not_found" in texts(missing)

            # A task can be cancelled through the tool while it waits in the queue or renders.
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(
                    f"{server.base_url}/v1/text_to_image",
                    json={"prompt": "slow", "size": "2048x2048", "num_inference_steps": 50},
                    headers={"Authorization": f"Bearer {api_key}"},
                )
            created = response.json()
            cancelled = await session.call_tool("cancel_task", {"task_id": created["id"]})
            assert not cancelled.is_error, texts(cancelled)
            assert created["id"] in texts(cancelled)
            # Cancelled while pending it ends at once; while rendering it stops at the next step.
            deadline = time.monotonic() + 60
            while "failed" not in texts(await session.call_tool("get_task", {"task_id": created["id"]})):
                assert time.monotonic() < deadline, "the cancelled task did not end"
                await anyio.sleep(0.1)
            again = await session.call_tool("cancel_task", {"task_id": created["id"]})
            assert again.is_error
            assert "task_finished" in texts(again)

    run_async(scenario)


def test_bad_key_is_reported_by_the_tool(server: LiveServer) -> None:
    async def scenario() -> None:
        async with stdio_session(server, "zimg_wrong") as session:
            result = await session.call_tool("check_balance", {})
            assert result.is_error
            assert "401" in texts(result)
            assert "invalid_api_key" in texts(result)

    run_async(scenario)


@pytest.fixture
def http_mcp(server: LiveServer, api_key: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zimage_server",
            "mcp",
            "--transport",
            "http",
            "--port",
            str(port),
            "--base-url",
            server.base_url,
            "--api-key",
            api_key,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the MCP HTTP server did not start"
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(30)


def test_streamable_http_transport(http_mcp: str) -> None:
    async def scenario() -> None:
        async with streamable_http_client(http_mcp) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS
            result = await session.call_tool("text_to_image", {"prompt": "a kite", "size": "256x256"})
            assert not result.is_error, texts(result)
            assert [type(block) for block in result.content] == [TextContent, ImageContent]
            balance = await session.call_tool("check_balance", {})
            assert "balance: 99 cents" in texts(balance)

    run_async(scenario)


def test_mcp_command_needs_a_key(server: LiveServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zimage_server", "mcp", "--base-url", server.base_url],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        timeout=60,
    )
    assert done.returncode == 2
    assert b"no API key" in done.stderr
