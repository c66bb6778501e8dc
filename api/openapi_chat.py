"""The OpenAI-compatible routes in the OpenAPI document (api.openapi): their views and operations.

The views describe what api.chat_routes answers, in OpenAI's shapes; the request body is described
field by field as api.chat_request reads it (docs/openai.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REF = "#/components/schemas/{model}"


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIErrorInfo(_View):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request parameter at fault, when one is")
    code: str | None = Field(description="this service's error code (model_not_found for an unknown model)")


class OpenAIError(_View):
    error: OpenAIErrorInfo


class ChatMessage(_View):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(_View):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(_View):
    cached_tokens: int = Field(description="prompt tokens reused from an earlier job over the same frames")


class CompletionUsage(_View):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(_View):
    id: str = Field(description="chatcmpl-<job id>")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ModelCard(_View):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="VIDEOQA_MODEL")
    max_model_len: int = Field(description="VIDEOQA_CONTEXT_TOKENS")


class ModelList(_View):
    object: Literal["list"]
    data: list[ModelCard]


VIEWS: list[type[BaseModel]] = [OpenAIError, ChatCompletion, ModelList, ModelCard]

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "description": "a name GET /v1/models lists"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "description": "system/developer, user and assistant messages; the last is the user's. Content: a "
            "string, or parts `text`, `image_url`, `video_url` (user messages) with http(s)://, s3://, data: or "
            "videoqa://videos/<id> URLs",
            "items": {"type": "object"},
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "max_new_tokens of the job"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "the same, older name"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "0 or absent: greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "media_io_kwargs": {
            "type": "object",
            "description": 'as vLLM: `{"video": {"num_frames": N, "fps": F}}`, the job\'s sampling',
        },
        "mm_processor_kwargs": {"type": "object", "description": "as vLLM: `num_frames`, `fps`"},
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("OpenAIError")}


def chat_operations(security: list[dict[str, list[str]]]) -> dict[str, dict[str, Any]]:
    errors = {
        "401": _error("missing or unknown API key (when keys are configured)"),
        "503": _error("Redis or storage unavailable"),
    }
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "summary": "OpenAI-compatible: answer a conversation about videos and images, as a job",
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_REQUEST}}},
                "responses": {
                    "200": {
                        "description": "the answer (a `chat.completion`), or with `stream: true` Server-Sent Events "
                        "of `chat.completion.chunk` objects ending with `data: [DONE]`",
                        "headers": {
                            "X-Videoqa-Job-Id": {"schema": {"type": "string"}, "description": "the job behind it"},
                            "Location": {"schema": {"type": "string"}, "description": "the job's URL"},
                        },
                        "content": {
                            **_json("ChatCompletion"),
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _error("invalid request; `param` names the parameter"),
                    "404": _error("`model_not_found`: a model this service does not serve"),
                    "409": _error("`cancelled`: the job was cancelled"),
                    "413": _error("body or a data: URL over VIDEOQA_MAX_UPLOAD_BYTES"),
                    "422": _error("the job failed on its media (`invalid_media`, `fetch_failed`...)"),
                    "429": _error("rate limit, or too many active jobs for this key"),
                    "500": _error("the job failed inside the service"),
                    "504": _error("`timeout`: the job had not ended after twice VIDEOQA_TASK_TIME_LIMIT_S; it goes on"),
                    **errors,
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "OpenAI-compatible: the model this service serves (VIDEOQA_MODEL) and its alias",
                "security": security,
                "responses": {"200": {"description": "the models", "content": _json("ModelList")}, **errors},
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "operationId": "getModel",
                "summary": "OpenAI-compatible: one served model",
                "security": security,
                "parameters": [model_id],
                "responses": {
                    "200": {"description": "the model", "content": _json("ModelCard")},
                    "404": _error("`model_not_found`"),
                    **errors,
                },
            }
        },
    }
