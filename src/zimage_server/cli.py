"""The `zimage` command: run the server, administer keys and credits, generate from a shell."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zimage_server import accounts, billing
from zimage_server.client import Task, TaskFailedError, TaskTimeoutError, ZImage, ZImageError
from zimage_server.config import Settings
from zimage_server.db.models import Account
from zimage_server.db.session import Database
from zimage_server.errors import ApiError

app = typer.Typer(help="Self-hosted, RunAPI-compatible Z-Image image generation.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Add and inspect account credits (in cents).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")

console = Console()
errors = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (database, images, models). Env: ZIMAGE_DATA_DIR."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _settings(**overrides: Any) -> Settings:
    return Settings(**{name: value for name, value in overrides.items() if value is not None})


@contextmanager
def _admin_session(data_dir: Path | None) -> Iterator[Session]:
    """The data directory's database, migrated, whether or not a server is using it right now."""
    settings = _settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.migrate()
        with db.session() as session:
            yield session
    except ApiError as exc:
        errors.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        db.dispose()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def ensure_default_account(session: Session, credits: int) -> accounts.CreatedKey | None:
    """On the very first start, create an account with free credits and a key so the server is usable."""
    if session.execute(select(func.count()).select_from(Account)).scalar_one():
        return None
    account = accounts.create_account(session, "default", credits=credits, bonus=True)
    return accounts.create_key(session, account, "default")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on. Env: ZIMAGE_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on. Env: ZIMAGE_PORT.")] = None,
    data_dir: DataDirOption = None,
    model: Annotated[
        str | None,
        typer.Option(help="auto, tiny, a local pipeline directory or a hub id. Env: ZIMAGE_MODEL."),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(help="normal, or low: offload idle components to the CPU. Env: ZIMAGE_MEMORY."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Server log level.")] = "info",
) -> None:
    """Run the API server and its worker."""
    import uvicorn

    from zimage_server.api.app import build_state, create_app

    settings = _settings(host=host, port=port, data_dir=data_dir, model=model, memory=memory)
    with console.status("choosing the model..."):
        state = build_state(settings)
    state.db.migrate()
    with state.db.session() as session:
        created = ensure_default_account(session, settings.default_account_credits)
    choice = state.model_choice
    base_url = settings.local_base_url()
    lines = [
        f"[bold]zimage-server[/bold] on {base_url}  (API docs: {base_url}/docs)",
        f"model: [bold]{choice.source}[/bold]  ({choice.reason})",
        f"data:  {settings.data_dir}",
    ]
    if choice.random_weights:
        lines.append("[yellow]tiny random weights: images are noise, not Z-Image output[/yellow]")
    if created is not None:
        lines += [
            "",
            f"Created account 'default' with {settings.default_account_credits} free credits (cents) "
            "and this API key.",
            "It is shown only now; keep it:",
            f"  [bold green]{created.key}[/bold green]",
            "",
            "Try it:",
            f"  curl -s {base_url}/api/v1/z_image/text_to_image -H 'Authorization: Bearer {created.key}' "
            "-H 'Content-Type: application/json' \\\n"
            """    -d '{"model":"z-image","prompt":"a cat","aspect_ratio":"1:1"}'""",
        ]
    else:
        lines.append("API keys: `zimage keys list`; new one: `zimage keys create --name NAME --credits 100`")
    console.print(Panel("\n".join(lines), expand=False))
    uvicorn.run(create_app(state), host=settings.host, port=settings.port, log_level=log_level)


@keys_app.command("create")
def keys_create(
    name: Annotated[
        str, typer.Option("--name", help="Name of the new account (or of the key, with --account).")
    ],
    credits: Annotated[int, typer.Option(help="Credits (cents) granted to a new account.", min=0)] = 0,
    account: Annotated[
        str | None, typer.Option(help="Add the key to this existing account (id or name) instead.")
    ] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key, by default for a new account with CREDITS cents. The key is shown once."""
    with _admin_session(data_dir) as session:
        if account is None:
            owner = accounts.create_account(session, name, credits=credits)
        else:
            owner = accounts.find_account(session, account)
            if credits:
                billing.grant(session, owner.id, credits, note="granted with a new key")
        created = accounts.create_key(session, owner, name)
        balance = owner.balance_cents
    if as_json:
        _print_json(
            {
                "key": created.key,
                "key_id": created.key_id,
                "account_id": created.account_id,
                "account_name": created.account_name,
                "balance_cents": balance,
            }
        )
        return
    console.print(f"API key for account {created.account_name!r} (id {created.account_id}), shown only once:")
    console.print(f"  [bold green]{created.key}[/bold green]")
    console.print(f"Balance: {balance} cents")


@keys_app.command("list")
def keys_list(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """List keys (prefixes only: the keys themselves are not stored)."""
    with _admin_session(data_dir) as session:
        rows: list[dict[str, Any]] = [
            {
                "key_id": key.id,
                "prefix": key.prefix,
                "name": key.name,
                "account_id": owner.id,
                "account_name": owner.name,
                "created_at": key.created_at.isoformat(),
                "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
                "revoked": key.revoked_at is not None,
            }
            for key, owner in accounts.list_keys(session)
        ]
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "prefix", "name", "account", "created", "last used", "state")
    for row in rows:
        table.add_row(
            str(row["key_id"]),
            f"{row['prefix']}...",
            row["name"],
            f"{row['account_name']} ({row['account_id']})",
            row["created_at"][:19],
            (row["last_used_at"] or "never")[:19],
            "revoked" if row["revoked"] else "active",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id or prefix, as `zimage keys list` shows them.")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    with _admin_session(data_dir) as session:
        revoked = accounts.revoke_key(session, key)
        console.print(f"revoked key {revoked.id} ({revoked.prefix}...)")


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    account: Annotated[str, typer.Argument(help="Account id or name.")],
    rotate: Annotated[
        bool, typer.Option(help="Replace the secret; receivers must switch to the new one.")
    ] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show (or rotate) the secret that signs the account's webhooks (Standard Webhooks, whsec_...)."""
    from zimage_server.webhooks import account_secret

    with _admin_session(data_dir) as session:
        owner = accounts.find_account(session, account)
        secret = account_secret(session, owner.id, rotate=rotate)
    if as_json:
        _print_json({"account_id": owner.id, "account_name": owner.name, "secret": secret, "rotated": rotate})
    else:
        console.print(f"webhook signing secret of {owner.name!r}{' (new)' if rotate else ''}:")
        console.print(f"  [bold]{secret}[/bold]")


def _balance_dict(session: Session, account: Account) -> dict[str, Any]:
    summary = billing.summarize(session, account.id)
    return {"account_id": account.id, "account_name": account.name, **dataclasses.asdict(summary)}


@credits_app.command("add")
def credits_add(
    account: Annotated[str, typer.Argument(help="Account id or name.")],
    cents: Annotated[int, typer.Argument(help="Credits to add, in cents.", min=1)],
    bonus: Annotated[bool, typer.Option(help="Grant as bonus credits (spent first).")] = False,
    note: Annotated[str, typer.Option(help="Reason, kept in the ledger.")] = "added with zimage credits add",
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grant credits to an account; the grant is a ledger row."""
    with _admin_session(data_dir) as session:
        owner = accounts.find_account(session, account)
        billing.grant(session, owner.id, cents, bonus=bonus, note=note)
        result = _balance_dict(session, owner)
    if as_json:
        _print_json(result)
    else:
        console.print(f"added {cents} cents to {owner.name!r}: balance {result['balance_cents']} cents")


@credits_app.command("show")
def credits_show(
    account: Annotated[str, typer.Argument(help="Account id or name.")],
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an account's balance and spending."""
    with _admin_session(data_dir) as session:
        result = _balance_dict(session, accounts.find_account(session, account))
    if as_json:
        _print_json(result)
        return
    table = Table("", "cents")
    for field, value in result.items():
        if field.endswith("_cents"):
            table.add_row(field.removesuffix("_cents").replace("_", " "), str(value))
    console.print(f"account {result['account_name']!r} (id {result['account_id']})")
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to save the (first) image.")] = Path(
        "out.png"
    ),
    base_url: Annotated[
        str, typer.Option(envvar="ZIMAGE_BASE_URL", help="Server URL. Env: ZIMAGE_BASE_URL.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="ZIMAGE_API_KEY", help="API key. Env: ZIMAGE_API_KEY.")
    ] = None,
    aspect_ratio: Annotated[str | None, typer.Option(help="1:1, 4:3, 3:4, 16:9 or 9:16.")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, multiples of 16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed, for a reproducible image.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    num_images: Annotated[
        int, typer.Option(help="Images to generate; extra ones get -1, -2... suffixes.")
    ] = 1,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
) -> None:
    """Submit a task to a running server, follow it with a progress bar, and save the image."""
    key = api_key or os.environ.get("RUNAPI_API_KEY")
    if not key:
        errors.print("[red]error:[/red] no API key: pass --api-key or set ZIMAGE_API_KEY")
        raise typer.Exit(2)
    output_format = output.suffix.lstrip(".").lower().replace("jpg", "jpeg") or "png"
    if output_format not in ("png", "jpeg", "webp"):
        errors.print("[red]error:[/red] the output file must end in .png, .jpg, .jpeg or .webp")
        raise typer.Exit(2)
    try:
        with (
            ZImage(base_url=base_url, api_key=key) as client,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=errors,
            ) as progress,
        ):
            bar = progress.add_task("queued", total=None, detail="")
            # A quick poll keeps the bar moving; polling is free, and the server is local or close.
            task = client.run(
                prompt,
                timeout=timeout,
                poll_interval=0.25,
                on_progress=_progress_updater(progress, bar),
                aspect_ratio=aspect_ratio,
                size=size,
                seed=seed,
                num_inference_steps=steps,
                num_images=num_images,
                negative_prompt=negative_prompt,
                output_format=output_format,
            )
            paths = client.save(task, output)
    except TaskTimeoutError as exc:
        errors.print(f"[red]error:[/red] task {exc.task.id} still {exc.task.status} after {timeout:.0f}s")
        raise typer.Exit(1) from None
    except TaskFailedError as exc:
        errors.print(f"[red]task {exc.task.id} failed:[/red] {exc.task.error}")
        raise typer.Exit(1) from None
    except ZImageError as exc:
        errors.print(_error_line(exc))
        raise typer.Exit(1) from None
    for path, image in zip(paths, task.images, strict=True):
        console.print(f"saved {path} ({image.width}x{image.height}, seed {image.seed})")
    console.print(f"task {task.id}: cost {task.usage.cost_cents if task.usage else 0} cent(s)")


def _progress_updater(progress: Progress, bar: TaskID) -> Callable[[Task], None]:
    def update(task: Task) -> None:
        if task.status == "pending":
            progress.update(bar, description="queued", detail=f"{task.queue_position or 0} ahead")
        elif task.status == "processing" and task.progress is not None:
            step, total = task.progress.step, task.progress.total
            progress.update(
                bar, description="rendering", total=total, completed=step, detail=f"step {step}/{total}"
            )
        elif task.done:
            end = progress.tasks[0].total or 1
            progress.update(bar, description=task.status, completed=end, total=end)

    return update


def _error_line(exc: ZImageError) -> str:
    if exc.status_code is None:
        return f"[red]error:[/red] {exc.message}"
    detail = f"{exc.code}: {exc.message}" if exc.code else exc.message
    return f"[red]error {exc.status_code}:[/red] {detail}"


@app.command("mcp")
def mcp_command(
    base_url: Annotated[
        str, typer.Option(envvar="ZIMAGE_BASE_URL", help="zimage-server URL. Env: ZIMAGE_BASE_URL.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="ZIMAGE_API_KEY", help="API key. Env: ZIMAGE_API_KEY.")
    ] = None,
    transport: Annotated[
        str, typer.Option(help="stdio (launched by the MCP host) or http (streamable HTTP at /mcp).")
    ] = "stdio",
    host: Annotated[str, typer.Option(help="Interface for --transport http.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for --transport http.")] = 8765,
) -> None:
    """Run an MCP server whose tools generate images on a zimage-server (needs the `mcp` extra)."""
    key = api_key or os.environ.get("RUNAPI_API_KEY")
    if not key:
        errors.print("[red]error:[/red] no API key: pass --api-key or set ZIMAGE_API_KEY")
        raise typer.Exit(2)
    if transport not in ("stdio", "http"):
        errors.print("[red]error:[/red] --transport must be stdio or http")
        raise typer.Exit(2)
    try:
        from zimage_server import mcp_server
    except ImportError as exc:
        errors.print(f"[red]error:[/red] {exc}; install it with: pip install 'zimage-server[mcp]'")
        raise typer.Exit(1) from None
    mcp_server.run(
        mcp_server.Connection(base_url=base_url, api_key=key),
        "stdio" if transport == "stdio" else "http",
        host=host,
        port=port,
    )


@app.command()
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            help="A pipeline directory or hub id; default: full-size random weights on a GPU, tiny on CPU."
        ),
    ] = None,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT to render.")] = "1024x1024",
    steps: Annotated[int, typer.Option(help="Denoising steps.", min=1)] = 8,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per row.", min=1)] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed repetitions first.", min=0)] = 2,
    clients: Annotated[int, typer.Option(help="Concurrent clients of the HTTP row.", min=1)] = 8,
    memory: Annotated[
        str, typer.Option(help="normal, or low: also measure CPU offload (CUDA only).")
    ] = "normal",
    attention: Annotated[
        str, typer.Option(help="Attention backend: auto or a diffusers backend name.")
    ] = "auto",
    compile_mode: Annotated[str, typer.Option("--compile", help="auto (CUDA only), on or off.")] = "auto",
    http: Annotated[bool, typer.Option(help="Include the HTTP service rows.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Measure the stock pipeline, our engine and the HTTP service side by side, in one run."""
    from zimage_server.bench import BenchOptions, render_table, run_bench
    from zimage_server.engine.resolutions import parse_size

    width, height = parse_size(size)
    options = BenchOptions(
        model=model,
        width=width,
        height=height,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        clients=clients,
        memory_low=memory == "low",
        attention_backend=attention,
        compile=compile_mode,
        http=http,
    )
    report = run_bench(options, progress=lambda line: errors.print(f"[dim]measuring {line}[/dim]"))
    if as_json:
        _print_json(report.as_dict())
    else:
        console.print(render_table(report))


@app.command("tiny-model")
def tiny_model(
    path: Annotated[Path, typer.Argument(help="Directory to write the pipeline to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny randomly initialised Z-Image pipeline (for tests and GPU-less trials)."""
    from zimage_server.engine.tiny import save_tiny_model

    save_tiny_model(path, seed=seed)
    console.print(
        f"wrote a tiny random Z-Image pipeline to {path}; serve it with `zimage serve --model {path}`"
    )
