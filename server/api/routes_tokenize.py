"""vLLM's /tokenize and /detokenize (also under /v1): text or chat messages to the token ids a model sees, and
back. Every adapter shares its base's tokenizer, but one with a resized vocabulary adds its new tokens
(server/lora/added_tokens.py); `model` is resolved, so a caller only reaches the names it may use."""

from fastapi import APIRouter, Request

from server.api.auth import caller
from server.api.chat import chat_prompt
from server.api.errors import ApiError
from server.api.schemas import DetokenizeRequest, TokenizeRequest
from server.api.state import app_state

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = app_state(request)
    tokenizer = state.tokenizers.of((await state.models.resolve(body.model, principal=caller(request))).adapter)
    if body.messages is not None:
        text, special = chat_prompt(tokenizer, body.messages), bool(body.add_special_tokens)
    else:
        text, special = body.prompt, body.add_special_tokens is not False
    ids = tokenizer.encode(text, add_special_tokens=special)
    answer = {"count": len(ids), "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return answer


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = app_state(request)
    tokenizer = state.tokenizers.of((await state.models.resolve(body.model, principal=caller(request))).adapter)
    vocab = len(tokenizer)
    outside = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if outside is not None:
        raise ApiError(400, f"token id {outside} is outside the vocabulary [0, {vocab})", param="tokens",
                       code="invalid_parameter")
    return {"prompt": tokenizer.decode(body.tokens)}
