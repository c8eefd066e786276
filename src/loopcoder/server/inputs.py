"""From an API request to what the engine runs: prompt token ids and SamplingParams.

Everything a client can get wrong is checked here, with the field named, so a bad request
is a 400 and never reaches the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopcoder.sampling import SamplingParams
from loopcoder.server.errors import APIError, bad_value
from loopcoder.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields, Tool
from loopcoder.tokenizer import Tokenizer


@dataclass
class EnginePrompt:
    token_ids: list[int]
    text: str | None  # what `echo` repeats


@dataclass
class ModelLimits:
    max_model_len: int
    vocab_size: int


def completion_prompts(req: CompletionRequest, tokenizer: Tokenizer | None, limits: ModelLimits) -> list[EnginePrompt]:
    """One prompt per entry of `prompt`; text with a `suffix` becomes a fill-in-the-middle prompt."""
    raw = req.prompt
    items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else raw
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(EnginePrompt(_encode_text(item, req, tokenizer), item))
        elif req.suffix is not None:
            raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
        else:
            ids = check_token_ids(list(item), limits, "prompt")
            prompts.append(EnginePrompt(ids, tokenizer.decode(ids) if tokenizer is not None else None))
    for prompt in prompts:
        check_length(len(prompt.token_ids), req.max_tokens, limits, "prompt")
    return prompts


def _encode_text(text: str, req: CompletionRequest, tokenizer: Tokenizer | None) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
    if req.suffix is not None:
        try:
            text = tokenizer.fim_prompt(text, req.suffix)
        except ValueError as e:
            raise APIError(400, str(e), param="suffix") from None
    try:
        return tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None


def chat_prompt(
    req: ChatCompletionRequest, tools: list[Tool] | None, tokenizer: Tokenizer | None, limits: ModelLimits
) -> EnginePrompt:
    """The conversation (and `tools`) rendered with the checkpoint's chat template, then tokenized."""
    text = render_chat(tokenizer, req.messages, tools, req.add_generation_prompt, req.chat_template_kwargs)
    ids = _tokenize_rendered(tokenizer, text)
    check_length(len(ids), chat_max_tokens(req), limits, "messages")
    return EnginePrompt(ids, text)


def tools_for_template(req: ChatCompletionRequest) -> list[Tool] | None:
    """Tools the model is told about; tool_choice "none" hides them.

    Forcing a call (tool_choice "required" or a named function) or JSON output needs
    constrained decoding, which the engine does not have, so those are refused, not faked.
    """
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported (only 'text')", param="response_format")
    choice = req.tool_choice
    if choice is not None and choice not in ("none", "auto"):
        raise APIError(400, "tool_choice 'required' or a named function is not supported: use 'auto' or 'none'", param="tool_choice")
    if choice == "none":
        return None
    return req.tools or None


def render_chat(
    tokenizer: Tokenizer | None,
    messages: list[ChatMessage],
    tools: list[Tool] | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    if tokenizer is None or tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(
            [template_message(m) for m in messages],
            tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - the template is trusted; what it chokes on is the request's data
        raise APIError(400, f"messages cannot be rendered with the chat template: {e}", param="messages") from None


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content always a string, developer as system."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tokenize_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=False)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"messages cannot be tokenized: {e}", param="messages") from None


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def check_length(prompt_len: int, max_tokens: int | None, limits: ModelLimits, param: str) -> None:
    """vLLM's rule: the prompt, plus max_tokens when given, must fit in the context."""
    if prompt_len == 0:
        raise APIError(400, "prompt is empty: give at least one token", param=param)
    if prompt_len >= limits.max_model_len:
        raise APIError(
            400, f"this model's maximum context length is {limits.max_model_len} tokens, but the prompt has {prompt_len}",
            param=param, code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_len + max_tokens > limits.max_model_len:
        raise APIError(
            400, f"this model's maximum context length is {limits.max_model_len} tokens, but {prompt_len} prompt tokens "
            f"plus max_tokens {max_tokens} is {prompt_len + max_tokens}",
            param="max_tokens", code="context_length_exceeded",
        )


def check_token_ids(ids: list[int], limits: ModelLimits, param: str) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})", param=param)
    return ids


def sampling_params(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None, limits: ModelLimits
) -> SamplingParams:
    """vLLM's SamplingParams from the request; its own checks become 400s naming the field."""
    check_token_ids(list(req.logit_bias or {}), limits, "logit_bias")
    check_token_ids(req.stop_token_ids or [], limits, "stop_token_ids")
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias or None,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:
        raise bad_value(e, set(type(req).model_fields)) from None
