"""`zimage bench` runs end to end on the CPU (tiny model, small size). Nothing is asserted about speed."""

from __future__ import annotations

import pytest

from zimage_server.bench import BenchOptions, render_table, run_bench
from zimage_server.engine.flops import count_generation_flops, datasheet_peak
from zimage_server.engine.full_size import published_config


def test_bench_measures_every_row_on_the_cpu() -> None:
    report = run_bench(BenchOptions(width=256, height=256, steps=2, repeats=2, warmup=1, clients=2))
    names = [row.name for row in report.rows]
    assert names == [
        "(a) stock pipeline",
        "(b) engine, batch 1",
        "(b4) engine, 4 tasks batched",
        "(c) HTTP service, 1 client(s)",
        "(c) HTTP service, 2 client(s)",
    ]
    for row in report.rows:
        assert row.p50 > 0
        assert row.p90 >= row.p50
        assert row.images_per_second > 0
        assert row.ratio_to_stock is not None
    assert report.rows[2].images == 8  # two repeats of four batched tasks
    assert report.flops["total"] > report.flops["transformer"] > 0
    assert report.as_dict()["rows"][0]["name"] == "(a) stock pipeline"
    assert render_table(report).row_count == 5


def test_flop_count_of_the_full_size_model_matches_the_published_estimate() -> None:
    configs = {name: published_config(name) for name in ("transformer", "text_encoder", "vae")}
    flops = count_generation_flops(configs, width=1024, height=1024, prompt_tokens=256, steps=8)
    # z-image-model.md: about 468 TFLOP for the DiT, 10.5 for the VAE decode at 1024x1024 with 256 tokens.
    assert flops.transformer == pytest.approx(468e12, rel=0.05)
    assert flops.vae_decode == pytest.approx(10.5e12, rel=0.1)
    assert flops.total == pytest.approx(flops.text_encoder + flops.transformer + flops.vae_decode)
    # Batch and CFG scale the denoising work.
    doubled = count_generation_flops(configs, width=1024, height=1024, prompt_tokens=256, steps=8, cfg=True)
    assert doubled.transformer == pytest.approx(2 * flops.transformer, rel=0.01)
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("some cpu") is None


def test_full_size_architecture_builds_from_the_shipped_configs() -> None:
    import torch

    from zimage_server.engine.full_size import build_components

    # On the meta device: the real shapes, no memory, no initialisation time.
    components = build_components(torch.device("meta"), torch.bfloat16)
    billions = {
        name: sum(p.numel() for p in module.parameters()) / 1e9 for name, module in components.items()
    }
    assert billions["transformer"] == pytest.approx(6.15, abs=0.01)  # z-image-model.md: 6.15 B
    assert billions["text_encoder"] == pytest.approx(4.0, abs=0.1)  # Qwen3-4B, tied embeddings
    assert 0.05 < billions["vae"] < 0.1
    assert all(p.dtype == torch.bfloat16 for module in components.values() for p in module.parameters())
