"""The Python API: ``mrs.load(...)`` returns a Pipeline that generates through the Engine.

    pipe = mrs.load("smollm2-135m")
    pipe.generate("The capital of France is", max_tokens=16).text
    pipe.chat([{"role": "user", "content": "Hi!"}]).text
    pipe.chat(messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    pipe.chat(messages, tools=[{"type": "function", "function": {...}}], tool_choice="required").tool_calls
    vlm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]}])
    pipe.generate("Answer yes or no:", grammar={"type": "regex", "value": "(yes|no)"})

There is one code path: every call is a request to the model's engine (so a list of
prompts is batched by continuous batching, like concurrent HTTP requests).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from mrs.compile_cache import enable_persistent_cache
from mrs.config.schema import EngineConfig, ModelEntry, engine_for, entry_from_dict
from mrs.engine import warm_start
from mrs.engine.engine import Engine
from mrs.engine.image_plan import check_image_count
from mrs.engine.stream import RequestStream
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta, TokenLogprob
from mrs.errors import ConfigError, InvalidRequest
from mrs.images import ImageLimits, count_images, take_images, text_only
from mrs.loading.chat_template import render_chat
from mrs.loading.checkpoint import Checkpoint
from mrs.models.config import ModelConfig
from mrs.models.registry import get_vision_arch
from mrs.response_format import output_grammar
from mrs.tools import Tool, ToolCall, calls_enabled, finish_reason, parse_reply, parse_tools, prompt_messages, reply_grammar

# The Python API's default engine: few slots and buckets, so loading compiles quickly.
DEFAULT_ENGINE = EngineConfig(max_batch=4, max_seq_len=512, max_queue=64, prefill_buckets=[64, 256])

Prompt = str | list[int]


@dataclass
class PreparedPrompt:
    """Token ids for the engine, and a vision model's preprocessed images (float32 [N, C, S, S])."""

    ids: list[int]
    pixel_values: Any = None

    def request(self, sampling: SamplingParams, request_id: str | None = None) -> GenerationRequest:
        named = {} if request_id is None else {"request_id": request_id}
        return GenerationRequest(self.ids, sampling, pixel_values=self.pixel_values, **named)


@dataclass
class Timing:
    prompt_tokens: int
    completion_tokens: int
    prompt_s: float  # submit to first token (prefill, queueing included)
    decode_s: float  # first token to last

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else float("nan")

    @property
    def decode_tok_per_s(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | tool_calls | cancelled | error
    timing: Timing
    logprobs: list[TokenLogprob] | None = None
    prompt_ids: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] | None = None  # chat with tools: the parsed calls (``text`` is what remains)
    prompt_logprobs: list[TokenLogprob] | None = None  # with prompt_logprobs=k: each prompt token's (the first None)


class Pipeline:
    """A loaded model with its running engine."""

    def __init__(self, entry: ModelEntry, checkpoint: Checkpoint, engine: Engine) -> None:
        self.entry = entry
        self.checkpoint = checkpoint
        self.engine = engine

    @property
    def tokenizer(self) -> Any:
        return self.checkpoint.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    # ---- what the server calls (it never reaches into the engine or the checkpoint) ----

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request on the engine; its event stream (see ``Engine.submit``)."""
        return self.engine.submit(request)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until every step variant is compiled (``load`` returns once the largest are and
        compiles the rest in the background); whether they are. See ``Engine.wait_compiled``."""
        return self.engine.wait_compiled(timeout)

    @property
    def context_limit(self) -> int:
        return self.engine.context_limit

    @property
    def has_chat_template(self) -> bool:
        return self.checkpoint.chat_template is not None

    @property
    def notes(self) -> list[str]:
        """What loading decided that a log reader wants to know (template, placement, ISQ)."""
        return self.checkpoint.notes

    def encode(self, prompt: Prompt) -> list[int]:
        """A raw prompt's ids (token ids pass through), with BOS where the checkpoint wants one."""
        if not isinstance(prompt, str):
            return list(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = self.checkpoint.bos_token_id
        if self.checkpoint.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], param: str = "tokens") -> str:
        """The text of token ids; an id outside the vocabulary is an InvalidRequest naming ``param``."""
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"{param}: token ids must be in [0, {vocab}); got {bad}", param=param)
        return self.tokenizer.decode(ids)

    @property
    def takes_images(self) -> bool:
        return self.checkpoint.vision is not None

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[Tool] | None = None,
                    image_limits: ImageLimits = ImageLimits(), **template: Any) -> list[int]:
        """The prompt ids of ``prepare_chat``."""
        return self.prepare_chat(messages, tools, image_limits, **template).ids

    def prepare_chat(self, messages: list[dict[str, Any]], tools: list[Tool] | None = None,
                     image_limits: ImageLimits = ImageLimits(), **template: Any) -> PreparedPrompt:
        """OpenAI-shaped messages (tool calls and results, image parts included) through the chat
        template, and a vision model's images through its processor (``mrs.images`` loads them
        within ``image_limits``); ``template`` passes e.g. ``add_generation_prompt``."""
        vision, count = self.checkpoint.vision, count_images(messages)
        if vision is None and count:  # checked before anything is fetched
            raise InvalidRequest(f"messages: model {self.entry.model_id!r} does not take images (a text-only model)",
                                 param="messages")
        if vision is not None:
            check_image_count(count, vision.spec, self.entry.model_id)
        messages, images = take_images(messages, image_limits)
        if vision is None:
            messages = text_only(messages)
        elif (own_prompt := get_vision_arch(vision.spec.arch).prompt) is not None:
            if tools:
                raise InvalidRequest(f"tools: model {self.entry.model_id!r} has no chat template to describe them",
                                     param="tools")
            ids, pixels = own_prompt(vision.processor, messages, images)
            return PreparedPrompt(ids, pixels)
        messages, template_tools = prompt_messages(messages, tools or [], self.checkpoint.chat_template)
        text = render_chat(self.checkpoint.chat_template, messages, self.tokenizer, model_id=self.entry.model_id,
                           tools=template_tools, **template)
        if vision is None:
            return PreparedPrompt(self.tokenizer.encode(text, add_special_tokens=False))  # the template writes BOS
        out = vision.processor(text=text, images=images or None, add_special_tokens=False, return_tensors="np")
        pixels = out.get("pixel_values") if images else None
        return PreparedPrompt(out["input_ids"][0].tolist(), None if pixels is None else pixels.astype("float32"))

    def generate(self, prompt: Prompt | list[Prompt], *, max_tokens: int = 64, temperature: float = 0.0,
                 response_format: Any = None, grammar: Any = None,
                 **sampling: Any) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt (text or token ids); a list of text prompts runs as one batch.

        ``sampling`` takes any ``SamplingParams`` field (top_k, top_p, min_p, seed, stop,
        logprobs, ...). Greedy by default. ``response_format`` and ``grammar`` constrain
        the output as the HTTP fields do (``mrs.response_format``).
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                grammar=output_grammar(response_format, grammar), **sampling)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return self._run_all([PreparedPrompt(self.encode(p)) for p in prompt], params)
        return self._run_all([PreparedPrompt(self.encode(prompt))], params)[0]

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 64, temperature: float = 0.0,
             response_format: Any = None, grammar: Any = None, tools: list[Any] | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True, **sampling: Any) -> GenerationResult:
        """Answer a conversation through the model's chat template.

        ``tools``/``tool_choice``/``parallel_tool_calls`` as in OpenAI's API (``mrs.tools``): the
        result's ``tool_calls`` holds the parsed calls and ``finish_reason`` is ``tool_calls``.
        """
        parsed, choice = parse_tools(tools, tool_choice)
        choice = choice or ("auto" if parsed else None)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling,
                                grammar=reply_grammar(parsed, choice, parallel_tool_calls, response_format, grammar))
        result = self._run_all([self.prepare_chat(messages, parsed if calls_enabled(parsed, choice) else None)], params)[0]
        if calls_enabled(parsed, choice):
            content, calls = parse_reply(result.text)
            if calls:
                result.text, result.tool_calls = content or "", calls
                result.finish_reason = finish_reason(result.finish_reason, True)
        return result

    def stream(self, prompt: Prompt, *, max_tokens: int = 64, temperature: float = 0.0,
               response_format: Any = None, grammar: Any = None, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text as it is generated (``generate``'s arguments)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                grammar=output_grammar(response_format, grammar), **sampling)
        for event in self.engine.submit(GenerationRequest(self.encode(prompt), params)):
            if isinstance(event, TokenDelta) and event.text:
                yield event.text
            elif isinstance(event, Finish) and event.reason == "error":
                raise RuntimeError(f"generation failed: {event.error}") from event.error

    def _run_all(self, prompts: list[PreparedPrompt], params: SamplingParams) -> list[GenerationResult]:
        begin = time.perf_counter()
        streams = [self.engine.submit(prompt.request(params)) for prompt in prompts]
        return [self._collect(prompt.ids, stream, begin) for prompt, stream in zip(prompts, streams)]

    @staticmethod
    def _collect(prompt_ids: list[int], stream: Any, begin: float) -> GenerationResult:
        text, ids, logprobs, first, finish, prompt_logprobs = [], [], [], None, None, None
        for event in stream:
            if isinstance(event, TokenDelta):
                first = first or time.perf_counter()
                text.append(event.text)
                ids += event.token_ids
                logprobs += event.logprobs or []
                prompt_logprobs = prompt_logprobs or event.prompt_logprobs
            else:
                finish = event
        if finish.reason == "error":
            raise RuntimeError(f"generation failed: {finish.error}") from finish.error
        end = time.perf_counter()
        first = first or end
        timing = Timing(len(prompt_ids), len(ids), first - begin, end - first)
        return GenerationResult("".join(text), ids, finish.reason, timing, logprobs or None, prompt_ids,
                                prompt_logprobs=prompt_logprobs)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _entry(model: str | dict[str, Any] | ModelEntry) -> ModelEntry:
    if isinstance(model, ModelEntry):
        return model
    if isinstance(model, dict):
        if _is_seed_entry(model):  # {"model_id": ..., "model": {"Gguf": {...}}, ...}: the JSON file's form
            from mrs.config.mistralrs import parse_multi_model_config

            return parse_multi_model_config([model], source="mrs.load")[0]
        return entry_from_dict(model)
    if isinstance(model, str):
        from mrs.config.hydra import model_preset  # Hydra only when a preset is named

        return model_preset(model)
    raise ConfigError(f"mrs.load takes a preset name, a dict or a ModelEntry, not {type(model).__name__}")


def _is_seed_entry(data: dict[str, Any]) -> bool:
    spec = data.get("model")
    return isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("Plain", "Gguf", "VisionPlain")


def _engine_config(engine: str | dict[str, Any] | EngineConfig | None) -> EngineConfig:
    if engine is None:
        return DEFAULT_ENGINE
    if isinstance(engine, EngineConfig):
        return engine
    if isinstance(engine, dict):
        return EngineConfig(**engine)
    if isinstance(engine, str):
        from omegaconf import OmegaConf

        from mrs.config.hydra import compose_config

        return OmegaConf.to_object(compose_config([f"engine={engine}"]).engine)
    raise ConfigError(f"engine must be a preset name, a dict or an EngineConfig, not {type(engine).__name__}")


def load(
    model: str | dict[str, Any] | ModelEntry,
    engine: str | dict[str, Any] | EngineConfig | None = None,
    **entry_fields: Any,
) -> Pipeline:
    """Load a model (preset name from conf/model/, a ModelEntry-shaped dict, or a ModelEntry)
    and start its engine (``engine``: a conf/engine/ preset name, dict or EngineConfig).

    ``entry_fields`` override ModelEntry fields, e.g. ``dtype="bfloat16"`` or
    ``dequantize_gguf=True``.
    """
    from mrs.loading.load import load_checkpoint

    entry = _entry(model)
    try:
        entry = dataclasses.replace(entry, **entry_fields)
    except TypeError as err:
        raise ConfigError(f"mrs.load: {err}") from None
    engine_config = engine_for(entry, _engine_config(engine))
    enable_persistent_cache()
    warm_key = warm_start.key(entry, engine_config)
    warm_start.read_ahead(warm_key)  # the executables load while the weights do
    try:
        checkpoint = load_checkpoint(entry)
        return Pipeline(entry, checkpoint, Engine(checkpoint, engine_config, warm_key).start())
    except BaseException:
        warm_start.drop(warm_key)
        raise
