"""The inference engine: diffusers' ``ZImagePipeline`` with the Turbo settings and the time taken out.

What it changes against the stock pipeline, keeping the images the same for the same seeds:
- prompts are encoded padded to the batch's longest prompt, not to 512 tokens, and cached (LRU);
- tasks that share a size and a step count render as one batch, each image seeded on its own;
- on CUDA, the repeated transformer blocks are compiled once (regionally, with dynamic shapes, so the
  supported sizes do not recompile) and the attention backend can be chosen;
- a low-memory mode offloads idle components to the CPU for 16 GB cards.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL.Image import Image

from zimage_server.engine.source import FULL_RANDOM
from zimage_server.engine.spec import MAX_SEQUENCE_LENGTH, GenerationCancelled, GenerationSpec, batch_key

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], bool]
"""Called after each denoising step with ``(step, total)``; returning False cancels the generation."""

MemoryMode = Literal["normal", "low"]


@dataclass(frozen=True)
class EngineOptions:
    # "auto" keeps diffusers' native SDPA, which picks flash or memory-efficient kernels per call;
    # any diffusers backend name ("_native_cudnn", "flash", "_flash_3", ...) can be forced.
    attention_backend: str = "auto"
    # Regional torch.compile of the repeated transformer blocks: "auto" means on CUDA only.
    compile: Literal["auto", "on", "off"] = "auto"
    memory: MemoryMode = "normal"
    prompt_cache_size: int = 256


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what the model was trained in; CPUs run it slowly or not at all, so they get float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quiet_loading() -> None:
    """Loading-bar output would interleave with the server's logs; the log line above says enough."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class PromptCache:
    """Least-recently-used text embeddings: agents and users repeat prompts, and the text encoder is 4B."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> torch.Tensor | None:
        with self._lock:
            found = self._entries.get(prompt)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(prompt)
            self.hits += 1
            return found

    def put(self, prompt: str, embedding: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[prompt] = embedding
            self._entries.move_to_end(prompt)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class ZImageEngine:
    def __init__(
        self,
        pipeline: Any,
        *,
        source: str,
        random_weights: bool = False,
        options: EngineOptions | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.random_weights = random_weights
        self.options = options or EngineOptions()
        self.device: torch.device = pipeline._execution_device
        self.dtype: torch.dtype = pipeline.transformer.dtype
        self.prompt_cache = PromptCache(self.options.prompt_cache_size)
        self.compiled = False
        pipeline.set_progress_bar_config(disable=True)
        self._apply_options()

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        random_weights: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: EngineOptions | None = None,
    ) -> ZImageEngine:
        """Load a pipeline with ``from_pretrained`` from a local directory or a hub id."""
        from diffusers import ZImagePipeline

        quiet_loading()
        options = options or EngineOptions()
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        log.info("loading %s on %s in %s (memory %s)", source, device, dtype, options.memory)
        if str(source) == FULL_RANDOM:
            from zimage_server.engine.full_size import build_full_size_pipeline

            # Built where its weights will live: on the GPU, or in CPU memory when they are offloaded.
            pipeline = build_full_size_pipeline(
                device if options.memory == "normal" else torch.device("cpu"), dtype
            )
        else:
            pipeline = ZImagePipeline.from_pretrained(str(source), dtype=dtype)
        place(pipeline, device, options.memory)
        return cls(pipeline, source=str(source), random_weights=random_weights, options=options)

    def _apply_options(self) -> None:
        transformer = self.pipeline.transformer
        if self.options.attention_backend != "auto":
            transformer.set_attention_backend(self.options.attention_backend)
        wants_compile = self.options.compile == "on" or (
            self.options.compile == "auto" and self.device.type == "cuda"
        )
        if wants_compile:
            # Only the 30 identical blocks are compiled: one graph reused 30 times compiles in seconds.
            # Dynamic shapes, so the token count of each size and prompt length does not recompile.
            transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
            self.compiled = True

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "random_weights": self.random_weights,
        }

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Text embeddings exactly as the stock pipeline computes them, without its 512-token padding.

        The stock pipeline pads every prompt to 512 tokens; the text encoder is causal and masked, so the
        padding changes nothing in the kept embeddings but costs a 512-token forward pass. Padding to the
        longest prompt of the batch gives the same embeddings for a fraction of the work. Repeated
        prompts come from the cache without touching the text encoder.
        """
        found = {prompt: self.prompt_cache.get(prompt) for prompt in dict.fromkeys(prompts)}
        missing = [prompt for prompt, embedding in found.items() if embedding is None]
        if missing:
            for prompt, embedding in zip(missing, self._encode(missing), strict=True):
                self.prompt_cache.put(prompt, embedding)
                found[prompt] = embedding
        return [found[prompt] for prompt in prompts]  # type: ignore[misc]

    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        tokenizer = self.pipeline.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]
        inputs = tokenizer(
            texts, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        )
        device = self.pipeline._execution_device
        input_ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.pipeline.text_encoder(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def generate(self, spec: GenerationSpec, on_step: OnStep | None = None) -> list[Image]:
        """Render ``spec.num_images`` images; image ``i`` is the batch-of-one image for seed ``seed + i``."""
        return self.generate_batch([spec], on_step)[0]

    @torch.inference_mode()
    def generate_batch(
        self, specs: Sequence[GenerationSpec], on_step: OnStep | None = None
    ) -> list[list[Image]]:
        """Render several specs of one size and step count in one denoising batch; one image list per spec."""
        if not specs:
            return []
        if len({batch_key(spec) for spec in specs}) != 1:
            raise ValueError("a batch must share width, height, num_inference_steps and guidance_scale")
        first = specs[0]
        prompts = [spec.prompt for spec in specs for _ in range(spec.num_images)]
        prompt_embeds = self.encode_prompts(prompts)
        negative_embeds = (
            self.encode_prompts(
                [spec.negative_prompt or "" for spec in specs for _ in range(spec.num_images)]
            )
            if first.uses_cfg
            else None
        )
        generator_device = self.device if self.device.type != "meta" else torch.device("cpu")
        generators = [
            torch.Generator(device=generator_device).manual_seed(spec.seed + index)
            for spec in specs
            for index in range(spec.num_images)
        ]
        total = first.num_inference_steps

        def step_end(_pipeline: Any, index: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
            # Raising here leaves the pipeline before the next transformer call: that is the cancellation.
            if on_step is not None and not on_step(index + 1, total):
                raise GenerationCancelled(index + 1, total)
            return {}

        output = self.pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_images_per_prompt=1,
            height=first.height,
            width=first.width,
            num_inference_steps=total,
            guidance_scale=first.guidance_scale,
            generator=generators,
            callback_on_step_end=step_end,
            output_type="pil",
        )
        images = list(output.images)
        results: list[list[Image]] = []
        for spec in specs:
            results.append(images[: spec.num_images])
            images = images[spec.num_images :]
        return results

    def warm_up(self, sizes: Sequence[tuple[int, int]], steps: int = 2) -> None:
        """Run each size once so compilation and kernel selection happen before the first client waits."""
        for width, height in sizes:
            spec = GenerationSpec(
                prompt="warm-up",
                negative_prompt=None,
                width=width,
                height=height,
                num_images=1,
                num_inference_steps=steps,
                guidance_scale=0.0,
                seed=0,
            )
            self.generate(spec)


def place(pipeline: Any, device: torch.device, memory: MemoryMode) -> None:
    if memory == "low" and device.type == "cuda":
        # Components move to the GPU only while they run: the 8 GB text encoder and the transformer are
        # never resident together, which keeps a 1024x1024 generation under 16 GB.
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
