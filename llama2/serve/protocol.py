"""The OpenAI API as this server speaks it: request bodies (strictly typed), the error shape
``{"error": {"message", "type", "param", "code"}}`` with the validation failures mapped onto it, and the pieces of a
response (usage, server-sent events, the model card)."""
from __future__ import annotations

import json
import re
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["APIError", "error_body", "TextPart", "ChatMessage", "StreamOptions", "SamplingRequest", "ChatRequest",
           "CompletionRequest", "validation_error", "usage", "sse", "model_card"]


# -- errors in the OpenAI shape ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI answers it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=headers, content=error_body(
            self.message, self.type, self.param, self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict types (a string is not a number, 5.0 is not an int: a client sending them has a bug worth naming);
    unknown fields are ignored, as clients send fields of newer API versions."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    """"developer" is the newer API's name for the system message."""
    content: str | list[TextPart]


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """Fields shared by both endpoints. ``None`` means the default (some clients send explicit nulls)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def unsupported(self) -> None:
        """Refuse options the engine cannot honour rather than silently ignore them."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise _unsupported(name, f"{name} is not supported by this server (only 0)")

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(x for x in s if x)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of max_tokens; wins when both are given."""
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs:
            raise _unsupported("top_logprobs", "top_logprobs > 0 is not supported: the engine reports the sampled "
                               "token's log-probability only (use logprobs=true, top_logprobs=0)")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            raise _unsupported("logprobs", "logprobs > 0 is not supported: the engine reports the sampled token's "
                               "log-probability only (use logprobs=0)")
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise _unsupported(name, f"{name} is not supported")


def _unsupported(name: str, why: str) -> APIError:
    return APIError(400, why, param=name, code="unsupported_parameter")


# -- responses -----------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, choices: list) -> dict:
    """OpenAI's usage; completion tokens count every token the model produced, the final EOS included."""
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama2", "max_model_len": context}


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_error(errs: list[dict]) -> APIError:
    """A pydantic/FastAPI validation failure as one OpenAI error naming the field (``messages.0.content``), what
    was wrong and what was sent. Union members' tags (``str``, ``list[TextPart]``) are left out of the field's path."""
    if not errs:
        return APIError(400, "invalid request body")
    first = errs[0]
    kind = first.get("type", "")
    path = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
    if kind == "json_invalid":
        why = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    if not path:
        if kind == "missing":
            return APIError(400, "the request needs a JSON body", code="invalid_json")
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json)",
                        code="invalid_json")
    param = ".".join(path)
    sent = "" if kind == "missing" else f"; got {json.dumps(first.get('input'), default=str)[:60]}"
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}{sent}", param=param,
                    code="missing_field" if kind == "missing" else "invalid_type" if kind.endswith("_type")
                    or kind in ("string_type", "int_type", "float_type", "bool_type") else "invalid_value")
