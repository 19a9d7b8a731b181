"""Vision chat speed: mrs against HF transformers (eager) on the same weights, Gemma 3
vision and Kosmos-2.

    python tools/bench_vision.py [--models gemma3,kosmos2] [--tokens 32] [--runs 3]

No vision checkpoint can be downloaded here, so the weights are random, in real shapes
where they fit this machine, float32, with the tests' local tokenizers and each family's
own image processor:
- gemma3: a SigLIP-B/16 tower at 224x224 (12 layers, hidden 768; 196 patches pooled to 49
  image tokens) and a Gemma 3 270M-shaped text tower (18 layers, hidden 640), Gemma 3's
  chat template;
- kosmos2: Kosmos-2's own CLIP ViT-L/14 tower at 224x224 (24 layers, hidden 1024, 257
  tokens) and its latent-query projection to 64 image tokens; the text decoder at half
  Kosmos-2's width (24 layers, hidden 1024 instead of 2048), the prompt Kosmos2Processor's.
One image and a short text; greedy. Prints one table: time to first token (the image
encoder plus the prefill), decode tok/s after it, and the mrs/HF ratios (best of ``--runs``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' local checkpoint builders

from kosmos2_checkpoints import kosmos2_config, kosmos2_model, kosmos2_processor  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPImageProcessorPil,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Kosmos2ForConditionalGeneration,
    SiglipVisionConfig,
)
from vision_checkpoints import CHAT_TEMPLATE, gemma3_tokenizer, gemma3_vision_config, gemma3_vision_model, tiny_image  # noqa: E402

from mrs.config.schema import VISION_PLAIN, EngineConfig, ModelEntry, ModelSource  # noqa: E402
from mrs.engine.engine import Engine  # noqa: E402
from mrs.engine.types import SamplingParams, TokenDelta  # noqa: E402
from mrs.loading.load import load_checkpoint  # noqa: E402
from mrs.pipeline import Pipeline  # noqa: E402

IMAGE = 224
QUESTION = "What is in this picture? Describe it."
GROUNDING = "<grounding>An image of"


def picture():
    return tiny_image(0, size=(320, 240))


def build_gemma3(path: Path) -> Path:
    config = gemma3_vision_config(sliding_window=512)
    config.vision_config = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, image_size=IMAGE, patch_size=16,
                                              vision_use_head=False)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 640, 2048, 18
    text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.query_pre_attn_scalar = 4, 1, 256, 256
    text.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    text.max_position_embeddings = 1024
    config.mm_tokens_per_image = 49
    gemma3_vision_model(config=config).save_pretrained(path)
    images = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Gemma3Processor(images, gemma3_tokenizer(), chat_template=CHAT_TEMPLATE, image_seq_length=49).save_pretrained(path)
    return path


def gemma3_hf_inputs(processor: Any) -> dict:
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=[picture()], add_special_tokens=False, return_tensors="pt")


def build_kosmos2(path: Path) -> Path:
    processor = kosmos2_processor()
    processor.image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                      crop_size={"height": IMAGE, "width": IMAGE})
    config = kosmos2_config(len(processor.tokenizer), tied=True)
    config.vision_config.update(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=IMAGE, patch_size=14))
    config.text_config.update(dict(embed_dim=1024, ffn_dim=4096, layers=24, attention_heads=16,
                                   max_position_embeddings=1024))
    kosmos2_model(len(processor.tokenizer), config=config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@dataclass(frozen=True)
class Case:
    title: str
    build: Callable[[Path], Path]
    hf_class: type
    hf_inputs: Callable[[Any], dict]  # processor -> HF generate's inputs
    text: str  # the chat's text part
    image_tokens: int


CASES = {
    "gemma3": Case("Gemma 3 vision, SigLIP-B/16 + 270M-shaped text tower", build_gemma3, Gemma3ForConditionalGeneration,
                   gemma3_hf_inputs, QUESTION, 49),
    "kosmos2": Case("Kosmos-2, CLIP ViT-L/14 + its text decoder at hidden 1024", build_kosmos2,
                    Kosmos2ForConditionalGeneration,
                    lambda processor: processor(text=GROUNDING, images=picture(), return_tensors="pt"), GROUNDING, 64),
}


def messages(case: Case) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": picture()}, {"type": "text", "text": case.text}]}]


def bench_mrs(case: Case, path: Path, tokens: int, runs: int) -> dict[str, float]:
    entry = ModelEntry(model_id="vlm", model=ModelSource(kind=VISION_PLAIN, model_id=str(path)))
    checkpoint = load_checkpoint(entry)
    engine = Engine(checkpoint, EngineConfig(max_batch=1, max_seq_len=256, prefill_buckets=[64, 128],
                                                  compile_in_background=False)).start()
    pipe = Pipeline(entry, checkpoint, engine)
    best: dict[str, float] = {}
    for _ in range(runs):
        prompt = pipe.prepare_chat(messages(case))  # the processor's time is not in either side's figures
        begin = time.perf_counter()
        first = None
        for event in engine.submit(prompt.request(SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))):
            if isinstance(event, TokenDelta):
                first = first or time.perf_counter()
        end = time.perf_counter()
        run = {"ttft": first - begin, "decode": (tokens - 1) / (end - first), "prompt": len(prompt.ids)}
        best = run if not best or run["ttft"] < best["ttft"] else best
    best["warmup"] = engine.stats()["warmup_s"]
    pipe.close()
    return best


def bench_hf(case: Case, path: Path, tokens: int, runs: int) -> dict[str, float]:
    model = case.hf_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    inputs = case.hf_inputs(AutoProcessor.from_pretrained(path))

    def timed(new: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - begin

    ttft = min(timed(1) for _ in range(runs))
    whole = min(timed(tokens) for _ in range(runs))
    return {"ttft": ttft, "decode": (tokens - 1) / (whole - ttft), "prompt": inputs["input_ids"].shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gemma3,kosmos2", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        case = CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            path = case.build(Path(tmp) / name)
            hf = bench_hf(case, path, args.tokens, args.runs)
            ours = bench_mrs(case, path, args.tokens, args.runs)
        print(f"{case.title}: random float32 weights at {IMAGE}x{IMAGE}; one image, {ours['prompt']} prompt tokens "
              f"({case.image_tokens} of them the image's), {args.tokens} greedy tokens, best of {args.runs}; "
              f"mrs warm-up {ours['warmup']:.1f} s", flush=True)
        rows.append((name, hf, ours))
    print("| model | | HF eager | mrs | mrs speed / HF speed |")
    print("|---|---|---:|---:|---:|")
    for name, hf, ours in rows:
        print(f"| {name} | time to first token, s (image encoder + prefill) | {hf['ttft']:.3f} | {ours['ttft']:.3f} | "
              f"{hf['ttft'] / ours['ttft']:.2f}x |")
        print(f"| {name} | decode tok/s | {hf['decode']:.1f} | {ours['decode']:.1f} | "
              f"{ours['decode'] / hf['decode']:.2f}x |")


if __name__ == "__main__":
    main()
