"""Vision chat speed: mrs against HF transformers (eager) on the same Gemma 3 vision weights.

    python tools/bench_vision.py [--tokens 32] [--runs 3]

No vision checkpoint can be downloaded here, so the weights are random, in real shapes:
a SigLIP-B/16 tower at 224x224 (12 layers, hidden 768; 196 patches pooled to 49 image
tokens) and a Gemma 3 270M-shaped text tower (18 layers, hidden 640), float32, with the
tests' local tokenizer and Gemma 3's own image processor and chat template. One image
and a short question; greedy. Prints one table: time to first token (the image encoder
plus the prefill), decode tok/s after it, and the mrs/HF ratios (best of ``--runs``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' local checkpoint builders

from transformers import Gemma3ImageProcessorPil, Gemma3Processor, SiglipVisionConfig  # noqa: E402
from vision_checkpoints import CHAT_TEMPLATE, gemma3_tokenizer, gemma3_vision_config, gemma3_vision_model, tiny_image  # noqa: E402

from mrs.config.schema import VISION_PLAIN, EngineConfig, ModelEntry, ModelSource  # noqa: E402
from mrs.engine.engine import Engine  # noqa: E402
from mrs.engine.types import SamplingParams, TokenDelta  # noqa: E402
from mrs.loading.load import load_checkpoint  # noqa: E402
from mrs.pipeline import Pipeline  # noqa: E402

IMAGE, PATCH, IMAGE_TOKENS = 224, 16, 49
QUESTION = "What is in this picture? Describe it."


def build(path: Path) -> Path:
    config = gemma3_vision_config(sliding_window=512)
    config.vision_config = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, image_size=IMAGE, patch_size=PATCH,
                                              vision_use_head=False)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 640, 2048, 18
    text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.query_pre_attn_scalar = 4, 1, 256, 256
    text.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    text.max_position_embeddings = 1024
    config.mm_tokens_per_image = IMAGE_TOKENS
    model = gemma3_vision_model(config=config)
    model.save_pretrained(path)
    images = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Gemma3Processor(images, gemma3_tokenizer(), chat_template=CHAT_TEMPLATE,
                    image_seq_length=IMAGE_TOKENS).save_pretrained(path)
    return path


def messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": tiny_image(0, size=(320, 240))},
                                         {"type": "text", "text": QUESTION}]}]


def bench_mrs(path: Path, tokens: int, runs: int) -> dict[str, float]:
    entry = ModelEntry(model_id="vlm", model=ModelSource(kind=VISION_PLAIN, model_id=str(path)))
    checkpoint = load_checkpoint(entry)
    engine = Engine(checkpoint, EngineConfig(max_batch=1, max_seq_len=256, prefill_buckets=[64, 128])).start()
    pipe = Pipeline(entry, checkpoint, engine)
    best: dict[str, float] = {}
    for _ in range(runs):
        prompt = pipe.prepare_chat(messages())  # the processor's time is not in either side's figures
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


def bench_hf(path: Path, tokens: int, runs: int) -> dict[str, float]:
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[tiny_image(0, size=(320, 240))], add_special_tokens=False, return_tensors="pt")

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
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "gemma3-vision-b16-270m")
        hf = bench_hf(path, args.tokens, args.runs)
        ours = bench_mrs(path, args.tokens, args.runs)
    print(f"Gemma 3 vision, SigLIP-B/16 at {IMAGE}x{IMAGE} + 270M-shaped text tower, random float32 weights; "
          f"one image, {ours['prompt']} prompt tokens ({IMAGE_TOKENS} of them the image's), {args.tokens} greedy tokens, "
          f"best of {args.runs}; mrs warm-up {ours['warmup']:.1f} s")
    print("| | HF eager | mrs | mrs speed / HF speed |")
    print("|---|---:|---:|---:|")
    print(f"| time to first token, s (image encoder + prefill) | {hf['ttft']:.3f} | {ours['ttft']:.3f} | "
          f"{hf['ttft'] / ours['ttft']:.2f}x |")
    print(f"| decode tok/s | {hf['decode']:.1f} | {ours['decode']:.1f} | {ours['decode'] / hf['decode']:.2f}x |")


if __name__ == "__main__":
    main()
