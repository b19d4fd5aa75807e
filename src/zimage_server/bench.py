"""`zimage bench`: the stock diffusers pipeline, our engine and the live HTTP service, measured in one run.

Rows (a) the stock ``ZImagePipeline.__call__`` as the diffusers example runs it, (b) our engine at batch 1,
(b4) our engine with four tasks batched, (c) the HTTP service end to end with 1 and with N concurrent
clients, and on CUDA with ``--memory low`` the same engine with CPU offload. Every row reports p50/p90
latency, images per second, its ratio to (a), peak GPU memory and model FLOPs utilisation (the FLOPs of
one generation, counted from the architecture, over time and the device's bf16 peak).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zimage_server.engine.flops import GenerationFlops, count_generation_flops, datasheet_peak
from zimage_server.engine.pipeline import EngineOptions, ZImageEngine, default_device, default_dtype, place
from zimage_server.engine.spec import DEFAULT_STEPS, GenerationSpec
from zimage_server.process import ServerProcess

PROMPT = "a red fox sitting in fresh snow at sunrise, soft light, detailed fur, 35mm photograph"


@dataclass
class BenchOptions:
    model: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = DEFAULT_STEPS
    repeats: int = 5
    warmup: int = 2
    clients: int = 8
    memory_low: bool = False
    attention_backend: str = "auto"
    compile: str = "auto"
    http: bool = True


@dataclass
class Row:
    name: str
    latencies: list[float]
    images: int
    wall_seconds: float
    peak_memory_gib: float | None
    p50: float = 0.0
    p90: float = 0.0
    images_per_second: float = 0.0
    ratio_to_stock: float | None = None
    # For HTTP rows: median latency above the engine's batch-1 median, i.e. what the service adds.
    overhead_vs_engine: float | None = None
    mfu: float | None = None
    note: str = ""

    def finish(self, stock_p50: float | None, flops_per_image: float, peak_flops: float | None) -> None:
        ordered = sorted(self.latencies)
        self.p50 = statistics.median(ordered)
        self.p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        self.images_per_second = self.images / self.wall_seconds
        self.ratio_to_stock = self.p50 / stock_p50 if stock_p50 else None
        if peak_flops:
            self.mfu = flops_per_image * self.images_per_second / peak_flops


@dataclass
class BenchReport:
    device: str
    model: str
    size: str
    steps: int
    flops: dict[str, float]
    peak_flops_datasheet: float | None
    peak_flops_measured: float | None
    flop_bound_latency: float | None
    rows: list[Row] = field(default_factory=list)
    date: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["rows"]:
            row.pop("latencies")
        return data


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device, sink: list[float | None]) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    sink.append(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def _timed(device: torch.device, call: Callable[[int], int], repeats: int, warmup: int, name: str) -> Row:
    for index in range(warmup):
        call(-1 - index)
    _synchronize(device)
    latencies: list[float] = []
    images = 0
    memory: list[float | None] = []
    with _peak_memory(device, memory):
        started = time.perf_counter()
        for index in range(repeats):
            begin = time.perf_counter()
            images += call(index)
            _synchronize(device)
            latencies.append(time.perf_counter() - begin)
        wall = time.perf_counter() - started
    return Row(name, latencies, images, wall, memory[0])


def measured_matmul_peak(device: torch.device) -> float | None:
    """bf16 matrix-product rate this card reaches now: a realistic ceiling next to the datasheet's."""
    if device.type != "cuda":
        return None
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    runs = 20
    start.record()
    for _ in range(runs):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return float(2 * size**3 * runs / (start.elapsed_time(end) / 1000))


def build_pipeline(options: BenchOptions, device: torch.device) -> tuple[Any, str]:
    from diffusers import ZImagePipeline

    from zimage_server.engine.pipeline import quiet_loading

    quiet_loading()
    dtype = default_dtype(device)
    if options.model:
        pipeline = ZImagePipeline.from_pretrained(options.model, dtype=dtype)  # type: ignore[no-untyped-call]
        place(pipeline, device, "normal")
        return pipeline, options.model
    if device.type == "cuda":
        from zimage_server.engine.full_size import build_full_size_pipeline

        return build_full_size_pipeline(device, dtype), "full-size Z-Image-Turbo architecture, random weights"
    from zimage_server.engine.tiny import build_tiny_pipeline

    return build_tiny_pipeline().to(device), "tiny random Z-Image pipeline (no GPU here)"


def run_bench(options: BenchOptions, progress: Callable[[str], None] = lambda _line: None) -> BenchReport:
    device = default_device()
    pipeline, model_name = build_pipeline(options, device)
    pipeline.set_progress_bar_config(disable=True)
    prompt_tokens = len(
        pipeline.tokenizer(
            pipeline.tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
        ).input_ids
    )
    configs = {
        name: _config_dict(getattr(pipeline, name).config) for name in ("transformer", "text_encoder", "vae")
    }
    flops = count_generation_flops(
        configs, width=options.width, height=options.height, prompt_tokens=prompt_tokens, steps=options.steps
    )
    peak_datasheet = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak_measured = measured_matmul_peak(device)
    peak = peak_measured or peak_datasheet
    report = BenchReport(
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        model=model_name,
        size=f"{options.width}x{options.height}",
        steps=options.steps,
        flops=flops.as_dict(),
        peak_flops_datasheet=peak_datasheet,
        peak_flops_measured=peak_measured,
        flop_bound_latency=flops.total / peak if peak else None,
        date=time.strftime("%Y-%m-%d"),
    )

    def stock_call(index: int) -> int:
        generator = torch.Generator(device).manual_seed(1000 + index)
        pipeline(
            prompt=f"{PROMPT} #{index}",
            width=options.width,
            height=options.height,
            num_inference_steps=options.steps,
            guidance_scale=0.0,
            generator=generator,
        )
        return 1

    progress("(a) stock ZImagePipeline.__call__")
    rows = [_timed(device, stock_call, options.repeats, options.warmup, "(a) stock pipeline")]

    engine = ZImageEngine(
        pipeline,
        source=model_name,
        random_weights=True,
        options=EngineOptions(attention_backend=options.attention_backend, compile=options.compile),  # type: ignore[arg-type]
    )

    def spec(index: int, images: int = 1) -> GenerationSpec:
        return GenerationSpec(
            prompt=f"{PROMPT} #{index}",
            negative_prompt=None,
            width=options.width,
            height=options.height,
            num_images=images,
            num_inference_steps=options.steps,
            guidance_scale=0.0,
            seed=index + 10_000,
        )

    progress("(b) engine, batch 1")
    rows.append(
        _timed(
            device,
            lambda i: len(engine.generate(spec(i))),
            options.repeats,
            options.warmup,
            "(b) engine, batch 1",
        )
    )
    progress("(b4) engine, 4 tasks batched")
    rows.append(
        _timed(
            device,
            lambda i: sum(
                len(images) for images in engine.generate_batch([spec(4 * i + k) for k in range(4)])
            ),
            max(2, options.repeats // 2),
            1,
            "(b4) engine, 4 tasks batched",
        )
    )
    if options.http:
        served = options.model or ("full-random" if device.type == "cuda" else "tiny")
        for clients in sorted({1, options.clients}):
            progress(f"(c) HTTP service, {clients} client(s)")
            rows.append(_http_row(options, clients, served))
    if options.memory_low and device.type == "cuda":
        progress("low-VRAM mode (CPU offload)")
        place(pipeline, device, "low")
        rows.append(
            _timed(
                device,
                lambda i: len(engine.generate(spec(i))),
                options.repeats,
                1,
                "(b) engine, --memory low",
            )
        )

    stock_p50 = statistics.median(rows[0].latencies)
    engine_p50 = statistics.median(rows[1].latencies)
    for row in rows:
        row.finish(stock_p50, flops.total, peak)
        if row.name.startswith("(c)"):
            row.overhead_vs_engine = row.p50 - engine_p50
    report.rows = rows
    return report


def _http_row(options: BenchOptions, clients: int, served_model: str) -> Row:
    """The service end to end: `zimage serve` in its own process on loopback, driven through our SDK.

    A separate process, as in production: the clients' threads must not compete with the server for
    this process's interpreter lock.
    """
    from zimage_server.client import ZImage

    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as data_dir:
        env = {
            "ZIMAGE_RATE_LIMIT_PER_MINUTE": "1000000000",
            "ZIMAGE_RATE_LIMIT_BURST": "1000000",
            "ZIMAGE_MAX_PENDING_TASKS_PER_ACCOUNT": "100000",
            "ZIMAGE_WORKER_IDLE_POLL_SECONDS": "1.0",
            "ZIMAGE_ATTENTION_BACKEND": options.attention_backend,
            "ZIMAGE_COMPILE": options.compile,
        }
        server = ServerProcess(Path(data_dir) / "data", served_model, env=env)
        try:
            # A full-size model with its compile warm-up takes minutes to be ready.
            server.start(timeout=1800)
            base = server.base_url
            key = server.create_key("bench", 100_000_000)
            per_client = options.repeats if clients == 1 else max(2, options.repeats // 2)

            def client_loop(client_index: int, count: int) -> list[float]:
                latencies: list[float] = []
                with ZImage(base_url=base, api_key=key, timeout=600) as sdk:
                    for index in range(count):
                        begin = time.perf_counter()
                        sdk.run(
                            f"{PROMPT} #{client_index * 1000 + index}",
                            size=f"{options.width}x{options.height}",
                            num_inference_steps=options.steps,
                        )
                        latencies.append(time.perf_counter() - begin)
                return latencies

            client_loop(999, max(1, options.warmup))  # warm-up through the whole path
            with ThreadPoolExecutor(clients) as pool:
                started = time.perf_counter()
                results = list(pool.map(lambda c: client_loop(c, per_client), range(clients)))
                wall = time.perf_counter() - started
        finally:
            server.stop()
    latencies = [latency for result in results for latency in result]
    return Row(
        f"(c) HTTP service, {clients} client(s)", latencies, len(latencies), wall, None, note="server process"
    )


def _config_dict(config: Any) -> dict[str, Any]:
    # transformers configs are objects with to_dict(); diffusers configs are already mappings.
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def render_table(report: BenchReport) -> Any:
    from rich.table import Table

    def tflops(value: float | None) -> str:
        return f"{value / 1e12:.0f}" if value else "n/a"

    table = Table(
        title=(
            f"{report.model} on {report.device}, {report.size}, {report.steps} steps, "
            f"{report.flops['total'] / 1e12:.2f} TFLOP per image; peak bf16 TFLOP/s: "
            f"datasheet {tflops(report.peak_flops_datasheet)}, measured {tflops(report.peak_flops_measured)}"
        )
    )
    for column in ("row", "p50 s", "p90 s", "images/s", "vs (a)", "p50 - (b) ms", "peak GPU GiB", "MFU"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in report.rows:
        table.add_row(
            row.name,
            f"{row.p50:.4f}",
            f"{row.p90:.4f}",
            f"{row.images_per_second:.2f}",
            f"{row.ratio_to_stock:.2f}x" if row.ratio_to_stock else "",
            f"{row.overhead_vs_engine * 1000:+.0f}" if row.overhead_vs_engine is not None else "",
            f"{row.peak_memory_gib:.1f}" if row.peak_memory_gib is not None else "n/a",
            f"{row.mfu:.0%}" if row.mfu is not None else "n/a",
        )
    table.caption = (
        f"FLOP-bound lower limit per image on this device: {report.flop_bound_latency:.3f} s"
        if report.flop_bound_latency
        else "FLOP-bound limit: n/a (no known bf16 peak for this device)"
    )
    return table


__all__ = ["BenchOptions", "BenchReport", "GenerationFlops", "render_table", "run_bench"]
