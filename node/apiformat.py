"""OpenAI's formats, pure: a request body -> :class:`~node.completion.CompletionRequest`
(:func:`parse_request`), our error tree -> an HTTP status and an OpenAI error object
(:func:`map_error`, :class:`ApiError`), a finished completion -> ``usage`` and the ``cocoon``
object every response carries (:func:`usage_object`, :func:`cocoon_object`).
"""

from __future__ import annotations

import json

import attrs

from inference.messages import ChatMessage
from overlay.errors import BadRequest, InferenceError, MarketError, NodeError

from .completion import Completed, CompletionRequest

__all__ = [
    "ApiError",
    "ApiSettings",
    "cocoon_object",
    "finish_reason",
    "map_error",
    "parse_request",
    "usage_object",
]


class ApiError(NodeError):
    """An error answered to an HTTP client in OpenAI's format."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", code: str, param: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param or None,
                "code": self.code,
            }
        }


@attrs.frozen
class ApiSettings:
    api_key: str = ""  # when set, "Authorization: Bearer <key>" is required
    max_body: int = 1 << 20  # bytes of one request body
    default_max_tokens: int = 256  # when a request names none
    max_tokens_limit: int = 4096  # refuse larger max_tokens before asking the network


def _field(obj: dict[str, object], name: str, kinds: tuple[type, ...], default: object = None) -> object:
    value = obj.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' has the wrong type", code="invalid_type", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' has the wrong type", code="invalid_type", param=name)
    return value


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(400, f"{where}: only text content parts are supported", code="invalid_content")
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", code="invalid_content")


def parse_request(body: bytes, *, chat: bool, settings: ApiSettings) -> CompletionRequest:
    """An OpenAI request body -> CompletionRequest; ApiError(400) naming the bad field otherwise."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = _field(obj, "model", (str,))
    if not model:
        raise ApiError(400, "'model' is required", code="missing_model", param="model")
    n = _field(obj, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", code="unsupported_n", param="n")
    max_tokens = _field(obj, "max_completion_tokens", (int,)) or _field(obj, "max_tokens", (int,))
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    assert isinstance(max_tokens, int)
    if max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", code="invalid_max_tokens", param="max_tokens")
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"'max_tokens' is {max_tokens}, the limit is {settings.max_tokens_limit}",
            code="max_tokens_too_large",
            param="max_tokens",
        )
    temperature = _field(obj, "temperature", (int, float), 1.0)
    top_p = _field(obj, "top_p", (int, float), 1.0)
    assert isinstance(temperature, int | float)
    assert isinstance(top_p, int | float)
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(
            400, "'temperature' must be between 0 and 2", code="invalid_temperature", param="temperature"
        )
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "'top_p' must be in (0, 1]", code="invalid_top_p", param="top_p")
    seed = _field(obj, "seed", (int,))
    stop_raw = obj.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw) and len(stop_raw) <= 4:
        stop = tuple(stop_raw)
    else:
        raise ApiError(400, "'stop' must be a string or up to 4 strings", code="invalid_stop", param="stop")
    stream = _field(obj, "stream", (bool,), False)
    opts = _field(obj, "stream_options", (dict,))
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage") is True)
    max_price = _field(obj, "max_price_nanoton", (int,))
    min_tier = _field(obj, "min_tier", (str,))
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    if chat:
        raw = obj.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ApiError(
                400, "'messages' must be a non-empty list", code="invalid_messages", param="messages"
            )
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in {
                "system",
                "developer",
                "user",
                "assistant",
                "tool",
            }:
                raise ApiError(
                    400, f"messages[{i}] needs a valid role", code="invalid_messages", param="messages"
                )
            role = "system" if m["role"] == "developer" else str(m["role"])
            out.append(ChatMessage(role=role, content=_content_text(m.get("content", ""), f"messages[{i}]")))
        messages = tuple(out)
    else:
        raw_prompt = obj.get("prompt")
        if isinstance(raw_prompt, list) and len(raw_prompt) == 1 and isinstance(raw_prompt[0], str):
            raw_prompt = raw_prompt[0]
        if not isinstance(raw_prompt, str):
            raise ApiError(400, "'prompt' must be a string", code="invalid_prompt", param="prompt")
        prompt = raw_prompt
    return CompletionRequest(
        model=str(model),
        max_tokens=max_tokens,
        messages=messages,
        prompt=prompt,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed if isinstance(seed, int) else None,
        stop=stop,
        stream=bool(stream),
        include_usage=include_usage,
        max_price_completion=max_price if isinstance(max_price, int) else None,
        min_tier=min_tier if isinstance(min_tier, str) else None,
    )


def map_error(exc: BaseException) -> ApiError:
    """Our error tree -> an HTTP status and an OpenAI error object."""
    if isinstance(exc, ApiError):
        return exc
    name = type(exc).__name__
    if name == "UnknownModel":
        return ApiError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, BadRequest):
        code = {
            "ContextLengthExceeded": "context_length_exceeded",
            "MaxTokensTooLarge": "max_tokens_too_large",
            "InvalidSampling": "invalid_sampling",
        }.get(name, "bad_request")
        return ApiError(400, str(exc), code=code)
    if name == "Overloaded":
        return ApiError(503, str(exc), type_="server_error", code="overloaded")
    if isinstance(exc, MarketError):
        return ApiError(503, str(exc), type_="server_error", code="no_worker_available")
    if isinstance(exc, InferenceError | NodeError):
        return ApiError(
            502,
            f"the network could not complete the request: {exc}",
            type_="server_error",
            code="upstream_error",
        )
    return ApiError(500, "internal error", type_="server_error", code="internal")


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def cocoon_object(done: Completed) -> dict[str, object]:
    return {
        "workers": [attrs.asdict(w) for w in done.workers],
        "worker": done.workers[-1].peer_id if done.workers else None,
        "tier": done.workers[-1].tier if done.workers else None,
        "cost_nanoton": done.cost_nanoton,
        "ttft_ms": round(done.ttft_s * 1000, 2),
        "worker_decode_tok_s": round(done.worker_decode_tok_s, 2),
        "worker_ttft_ms": round(done.worker_ttft_s * 1000, 2),
    }


def usage_object(done: Completed) -> dict[str, object]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "cost_nanoton": done.cost_nanoton,
    }
