"""`zimage mcp`: an MCP server that gives agents (Hermes, Claude Desktop, IDEs) Z-Image as tools.

It is a client of a running zimage-server over HTTP, with one API key, so it runs wherever the agent runs
(stdio, launched by the host) or as a shared service (streamable HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent
from pydantic import Field

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
INSTRUCTIONS = (
    "Generate images with Z-Image on a zimage-server. text_to_image waits for the result and returns the "
    "image URLs (valid for days) and the images themselves. Each image costs credits: check_balance tells "
    "what is left. Prompts may be in Chinese or English."
)
# Tasks render in seconds on a GPU; the first poll comes quickly and later ones follow the server's hint.
_FIRST_POLL_SECONDS = 0.2
_MAX_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class Connection:
    base_url: str
    api_key: str
    timeout: float = 60.0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self.api_key}", "User-Agent": "zimage-mcp"},
            timeout=self.timeout,
        )


def _checked(response: httpx.Response) -> dict[str, Any]:
    """The JSON body, or a ToolError carrying the server's own explanation (which the agent can act on)."""
    if response.is_error:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        raise ToolError(f"zimage-server answered {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data


async def _call(connection: Connection, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    try:
        async with connection.client() as client:
            return _checked(await client.request(method, path, **kwargs))
    except httpx.TransportError as exc:
        raise ToolError(f"cannot reach zimage-server at {connection.base_url}: {exc}") from None


def _summary(task: dict[str, Any]) -> str:
    lines = [f"task {task['id']}: {task['status']}"]
    params = task.get("input", {})
    if "size" in params:
        lines.append(f"size {params['size']}, seed {task.get('seed')}")
    for index, image in enumerate(task.get("images") or []):
        lines.append(f"image {index + 1}: {image['url']}")
    if "usage" in task:
        lines.append(f"cost: {task['usage']['cost_cents']} cent(s)")
    if task.get("status") == "failed":
        lines.append(f"error ({task.get('error_code')}): {task.get('error')}")
    return "\n".join(lines)


def build_server(connection: Connection) -> MCPServer:
    # WARNING: at INFO the SDK logs every HTTP request, signed image URLs included, into the host's log.
    server: MCPServer = MCPServer("zimage", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    async def text_to_image(
        prompt: Annotated[str, Field(description="What to draw, Chinese or English, up to 1000 characters.")],
        aspect_ratio: Annotated[
            Literal["1:1", "4:3", "3:4", "16:9", "9:16"] | None,
            Field(description="Shape of the image; 1:1 (1024x1024) when neither this nor size is given."),
        ] = None,
        size: Annotated[
            str | None, Field(description='Exact "WIDTHxHEIGHT", multiples of 16, e.g. "768x1344".')
        ] = None,
        seed: Annotated[
            int | None, Field(ge=0, le=2**32 - 1, description="For a reproducible image.")
        ] = None,
        num_images: Annotated[int, Field(ge=1, le=16, description="How many images (each is billed).")] = 1,
        negative_prompt: Annotated[str | None, Field(description="What to avoid.")] = None,
        output_format: Literal["png", "jpeg", "webp"] = "png",
        include_images: Annotated[
            bool, Field(description="Return the images themselves as well as their URLs.")
        ] = True,
        wait_seconds: Annotated[
            float, Field(gt=0, le=3600, description="Stop waiting after this long and report the task id.")
        ] = 300.0,
    ) -> CallToolResult:
        """Generate images from a text prompt with Z-Image and wait for them.

        Returns the image URLs and, unless include_images is false, the images.
        """
        body = {
            "prompt": prompt,
            "aspect_ratio": aspect_ratio,
            "size": size,
            "seed": seed,
            "num_images": num_images,
            "negative_prompt": negative_prompt,
            "output_format": output_format,
        }
        task = await _call(
            connection,
            "POST",
            "/v1/text_to_image",
            json={key: value for key, value in body.items() if value is not None},
        )
        deadline = time.monotonic() + wait_seconds
        pause = _FIRST_POLL_SECONDS
        async with connection.client() as client:
            while task["status"] in ("pending", "processing"):
                if time.monotonic() > deadline:
                    return CallToolResult(
                        content=[
                            TextContent(
                                type="text",
                                text=f"{_summary(task)}\nstill running after {wait_seconds:g}s; "
                                f"call get_task with {task['id']!r} later.",
                            )
                        ]
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, _MAX_POLL_SECONDS)
                try:
                    task = _checked(await client.get(f"/v1/tasks/{task['id']}"))
                except httpx.TransportError as exc:
                    raise ToolError(
                        f"lost zimage-server while waiting for task {task['id']}: {exc}"
                    ) from None
        if task["status"] == "failed":
            return CallToolResult(content=[TextContent(type="text", text=_summary(task))], is_error=True)
        content: list[ContentBlock] = [TextContent(type="text", text=_summary(task))]
        if include_images:
            # Signed URLs need no key; they may point at another host (ZIMAGE_PUBLIC_BASE_URL), so the key
            # is not sent along.
            async with httpx.AsyncClient(timeout=connection.timeout) as downloader:
                for image in task["images"]:
                    try:
                        data = await downloader.get(image["url"])
                    except httpx.TransportError as exc:
                        raise ToolError(f"could not download {image['url']}: {exc}") from None
                    if data.is_error:
                        raise ToolError(f"could not download {image['url']}: {data.status_code}")
                    content.append(
                        ImageContent(
                            type="image",
                            data=base64.b64encode(data.content).decode("ascii"),
                            mime_type=image["content_type"],
                        )
                    )
        return CallToolResult(content=content)

    @server.tool()
    async def get_task(task_id: Annotated[str, Field(description="A task id (tsk_...).")]) -> str:
        """Read a task: its status, progress, image URLs, cost or error."""
        task = await _call(connection, "GET", f"/v1/tasks/{task_id}")
        return f"{_summary(task)}\n\n{json.dumps(task, ensure_ascii=False, indent=2)}"

    @server.tool()
    async def cancel_task(task_id: Annotated[str, Field(description="A task id (tsk_...).")]) -> str:
        """Cancel a pending or running task; its credits are refunded."""
        task = await _call(connection, "POST", f"/v1/tasks/{task_id}/cancel")
        return _summary(task)

    @server.tool()
    async def check_balance() -> str:
        """The account's credit balance, in cents (1 image costs about 1 cent)."""
        balance = await _call(connection, "GET", "/api/v1/me/balance")
        return (
            f"balance: {balance['balance_cents']} cents "
            f"({balance['paid_balance_cents']} paid, {balance['bonus_balance_cents']} bonus); "
            f"spent today: {balance['spent_cents_today']}; reserved by running tasks: "
            f"{balance['reserved_cents']}\n\n{json.dumps(balance, indent=2)}"
        )

    @server.tool()
    async def list_models() -> str:
        """The models this server offers (image models, and chat models when a chat upstream is set)."""
        models = await _call(connection, "GET", "/v1/models")
        lines = []
        for model in models["data"]:
            weights = model.get("served_weights") or {}
            note = " (tiny random weights: images are noise)" if weights.get("random_weights") else ""
            lines.append(f"{model['id']}: {model.get('description') or model.get('owned_by') or ''}{note}")
        return "\n".join(lines)

    return server


def run(
    connection: Connection,
    transport: Literal["stdio", "http"] = "stdio",
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
) -> None:
    server = build_server(connection)
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)
