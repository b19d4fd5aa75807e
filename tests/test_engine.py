"""The engine against the stock diffusers pipeline, on a tiny model saved and loaded for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from zimage_server.engine import GenerationCancelled, GenerationSpec, ZImageEngine, resolve_model_source
from zimage_server.engine.spec import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from zimage_server.engine.tiny import is_tiny_model

PROMPTS = [
    "a cat",
    "一只猫坐在红色的沙发上，柔和的光线",
    "an astronaut riding a horse on the moon, cinematic, 35mm",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ZImageEngine:
    return ZImageEngine.load(tiny_model_dir, random_weights=True)


@pytest.fixture(scope="module")
def stock(tiny_model_dir: Path) -> Any:
    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_pixel_difference(first: Any, second: Any) -> int:
    return int(np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max())


def spec(**overrides: Any) -> GenerationSpec:
    values: dict[str, Any] = dict(
        prompt="a red fox in snow",
        negative_prompt=None,
        width=256,
        height=256,
        num_images=1,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        seed=1234,
    )
    return GenerationSpec(**{**values, **overrides})


def test_tiny_model_round_trips_through_from_pretrained(tiny_model_dir: Path, engine: ZImageEngine) -> None:
    assert (tiny_model_dir / "model_index.json").is_file()
    assert is_tiny_model(tiny_model_dir)
    assert type(engine.pipeline).__name__ == "ZImagePipeline"
    assert engine.describe() == {
        "source": str(tiny_model_dir),
        "device": "cpu",
        "dtype": "float32",
        "random_weights": True,
    }


def test_prompt_embeddings_equal_the_stock_pipeline_without_512_padding(
    engine: ZImageEngine, stock: Any
) -> None:
    seen_lengths: list[int] = []
    hook = engine.pipeline.text_encoder.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        ours = engine.encode_prompts(list(PROMPTS))
    finally:
        hook.remove()
    with torch.inference_mode():
        theirs = stock.encode_prompt(
            list(PROMPTS), device=torch.device("cpu"), do_classifier_free_guidance=False
        )[0]
    # One text-encoder pass, padded to the batch's longest prompt instead of 512 tokens.
    longest = max(embedding.shape[0] for embedding in theirs)
    assert seen_lengths == [longest]
    assert longest < 100
    assert len(ours) == len(theirs) == len(PROMPTS)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_image_equals_the_stock_pipeline_for_the_same_seed(engine: ZImageEngine, stock: Any) -> None:
    ours = engine.generate(spec(width=320, height=192))[0]
    reference = stock(
        prompt="a red fox in snow",
        width=320,
        height=192,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images[0]
    assert ours.size == (320, 192)
    assert max_pixel_difference(ours, reference) <= 1


def test_each_image_of_a_batch_is_reproducible_from_its_own_seed(engine: ZImageEngine) -> None:
    batch = engine.generate(spec(num_images=3, seed=50))
    alone = engine.generate(spec(num_images=1, seed=52))[0]
    assert len(batch) == 3
    # Batched matmuls round differently from single ones: equal up to a pixel level or two.
    assert max_pixel_difference(batch[2], alone) <= 2
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_guidance_above_zero_uses_the_negative_prompt(engine: ZImageEngine) -> None:
    with_negative = engine.generate(spec(guidance_scale=4.0, negative_prompt="blurry"))[0]
    without = engine.generate(spec(guidance_scale=4.0))[0]
    assert not np.array_equal(np.asarray(with_negative), np.asarray(without))


def test_on_step_reports_every_step_and_can_cancel(engine: ZImageEngine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate(
        spec(num_inference_steps=4), on_step=lambda step, total: steps.append((step, total)) or True
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(GenerationCancelled) as cancelled:
        engine.generate(spec(num_inference_steps=6), on_step=lambda step, _total: step < 2)
    assert (cancelled.value.step, cancelled.value.total) == (2, 6)


def test_spec_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="num_images"):
        spec(num_images=5)
    with pytest.raises(ValueError, match="guidance_scale"):
        spec(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="width and height"):
        spec(width=0)


def test_model_choice(tmp_path: Path, tiny_model_dir: Path) -> None:
    tiny = resolve_model_source("tiny", tmp_path)
    assert tiny.random_weights
    assert (Path(tiny.source) / "model_index.json").is_file()
    local = resolve_model_source(str(tiny_model_dir), tmp_path)
    assert local.source == str(tiny_model_dir.resolve())
    assert local.random_weights
    hub = resolve_model_source("Tongyi-MAI/Z-Image-Turbo", tmp_path)
    assert hub.source == "Tongyi-MAI/Z-Image-Turbo"
    assert not hub.random_weights
    # No GPU and no weights on this machine: auto must fall back to the tiny model, and say so.
    auto = resolve_model_source("auto", tmp_path / "empty")
    assert auto.random_weights
    assert "noise" in auto.reason
    with pytest.raises(ValueError, match=r"model_index\.json"):
        resolve_model_source(str(tmp_path), tmp_path)


def test_prompt_cache_skips_the_text_encoder_for_repeated_prompts(engine: ZImageEngine) -> None:
    calls: list[int] = []
    hook = engine.pipeline.text_encoder.register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        first = engine.encode_prompts(["cache me", "and me"])
        second = engine.encode_prompts(["and me", "cache me", "and me", "new one"])
    finally:
        hook.remove()
    # The second call encodes only the prompt it has not seen, alone.
    assert calls == [2, 1]
    assert second[1] is first[0]
    assert second[0] is first[1]


def test_a_batch_of_tasks_renders_each_as_it_would_alone(engine: ZImageEngine) -> None:
    specs = [spec(prompt="a red fox", seed=1), spec(prompt="一只猫", seed=2, num_images=2)]
    batched = engine.generate_batch(specs)
    assert [len(images) for images in batched] == [1, 2]
    alone = [engine.generate(one) for one in specs]
    for batch_images, single_images in zip(batched, alone, strict=True):
        for batch_image, single_image in zip(batch_images, single_images, strict=True):
            assert max_pixel_difference(batch_image, single_image) <= 2
    with pytest.raises(ValueError, match="share"):
        engine.generate_batch([spec(width=256), spec(width=512)])


def test_regional_compile_does_not_recompile_across_sizes_and_prompts() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from zimage_server.engine.pipeline import EngineOptions
    from zimage_server.engine.resolutions import ASPECT_RATIO_SIZES
    from zimage_server.engine.tiny import build_tiny_pipeline

    compiled = ZImageEngine(build_tiny_pipeline(), source="tiny", options=EngineOptions(compile="on"))
    assert compiled.compiled
    compiled.warm_up([(512, 512)])
    graphs = counters["stats"]["unique_graphs"]
    # Every preset size and prompts of other lengths run on the graph compiled once: any recompile raises.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for index, (width, height) in enumerate(ASPECT_RATIO_SIZES.values()):
            compiled.generate(
                spec(width=width, height=height, num_inference_steps=2, prompt="a cat " * (index * 7 + 1))
            )
    assert counters["stats"]["unique_graphs"] == graphs
