"""``POST /tokenize`` and ``/detokenize`` (vLLM's and mistral.rs's extensions)."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response
from quart_schema import validate_request

from mrs.tools import parse_tools
from serving import protocol, responses
from serving.responses import documented
from serving.routes.common import acquire, json_reply, services

blueprint = Blueprint("tokenizer", __name__)


@blueprint.post("/tokenize")
@documented(responses.TokenizeResponse)
@validate_request(protocol.TokenizeRequest)
async def tokenize(data: protocol.TokenizeRequest) -> Response:
    model_id = services().table.resolve(data.model)
    with await acquire(model_id) as served:
        if data.messages is not None:
            ids = await asyncio.to_thread(
                served.encode_chat, [m.openai() for m in data.messages], parse_tools(data.tools, None)[0],
                services().limits.images, add_generation_prompt=data.add_generation_prompt,
                continue_final_message=data.continue_final_message)
        elif data.add_special_tokens:
            ids = await asyncio.to_thread(served.encode, data.prompt)
        else:
            ids = await asyncio.to_thread(served.tokenizer.encode, data.prompt, add_special_tokens=False)
        reply = {"model": model_id, "tokens": ids, "count": len(ids), "max_model_len": served.context_limit}
        if data.return_token_strs:
            reply["token_strs"] = served.tokenizer.convert_ids_to_tokens(ids)
        return json_reply(reply)


@blueprint.post("/detokenize")
@documented(responses.DetokenizeResponse)
@validate_request(protocol.DetokenizeRequest)
async def detokenize(data: protocol.DetokenizeRequest) -> Response:
    model_id = services().table.resolve(data.model)
    with await acquire(model_id) as served:
        return json_reply({"model": model_id, "prompt": await asyncio.to_thread(served.decode, data.tokens)})
