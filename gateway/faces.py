"""API faces: the shapes the gateway's routes speak, as data.

A face is everything that differs between two routes that send the same
kind of request to Azure: the upstream operation, how the body is checked
and which model it asks for, what an error and a stream's last error event
look like, and how a success is wrapped. The pipeline (gateway/pipeline.py)
does the rest the same way for every face; one handler serves them all.

Adding a route for a new API is one `Face` here and one entry in the route
table (handlers/app.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs

from gateway import embeddings, responses
from gateway.errors import GatewayError, render_envelope, render_openai_error
from gateway.gpt_chat import build_gpt_chat_body
from gateway.policy.estimate import Operation
from gateway.upstream.sse import encode_event, is_done, usage_in

CHAT_COMPLETIONS = "chat/completions"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"
JSON = "application/json"
JSON_UTF8 = "application/json; charset=utf-8"


def unknown_model(model: str | None, listed: Sequence[str]) -> GatewayError:
    """404 naming the model, and what GET /v1/models shows the caller instead."""
    choices = ", ".join(repr(name) for name in listed) or "none"
    return GatewayError(
        404,
        "model_not_found",
        f"No deployment serves the model {model!r}; the models you may use: {choices}.",
        param="model",
    )


def unknown_azure_deployment(model: str | None, listed: Sequence[str]) -> GatewayError:
    """Azure's own answer for a deployment that does not exist."""
    return GatewayError(
        404,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist.",
        param="deployment",
    )


def model_in_body(body: Mapping[str, Any], path_args: tuple[str, ...]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) else None


def no_model(body: Mapping[str, Any], path_args: tuple[str, ...]) -> str | None:
    return None


def deployment_in_path(body: Mapping[str, Any], path_args: tuple[str, ...]) -> str | None:
    return path_args[0]


def require_api_version(query: str) -> None:
    """Azure's 404 for a request without `api-version` (what Azure itself answers)."""
    if not parse_qs(query).get("api-version"):
        raise GatewayError(
            404,
            "404",
            "Resource not found: the api-version query parameter is required.",
            param="api-version",
        )


def accept_any_query(query: str) -> None:
    return None


def as_sent(response_body: bytes, document: Mapping[str, Any]) -> bytes:
    """Azure's body, byte for byte."""
    return response_body


def in_success_envelope(response_body: bytes, document: Mapping[str, Any]) -> bytes:
    """Azure's object with `"success": 1` in front, spliced rather than re-encoded."""
    body = response_body.lstrip()
    return b'{"success":1,' + body[1:] if document else b'{"success":1}'


def chat_usage(document: Mapping[str, Any]) -> dict[str, Any] | None:
    usage = document.get("usage")
    return usage if isinstance(usage, dict) else None


def envelope_event(error: GatewayError, last_event: bytes | None) -> bytes:
    return encode_event(render_envelope(error))


def openai_error_event(error: GatewayError, last_event: bytes | None) -> bytes:
    return encode_event(render_openai_error(error))


def previous_response(body: Mapping[str, Any], path_args: tuple[str, ...]) -> str | None:
    previous = body.get("previous_response_id")
    return previous if isinstance(previous, str) and previous else None


def response_in_path(body: Mapping[str, Any], path_args: tuple[str, ...]) -> str | None:
    return path_args[0]


@dataclass(frozen=True)
class Face:
    """One API shape. See the module docstring."""

    route: str  # the route's name in the access log and the metrics
    operation: str  # the upstream operation (gateway/upstream/urls.py)
    schema: str  # the JSON Schema `$id` the body is checked against
    model: Callable[[Mapping[str, Any], tuple[str, ...]], str | None]
    render_error: Callable[[GatewayError], dict[str, Any]]
    # A stream's last event when it fails, given the last event the caller got.
    stream_error: Callable[[GatewayError, bytes | None], bytes]
    wrap_success: Callable[[bytes, Mapping[str, Any]], bytes]
    content_type: str
    # The 404 for a model no deployment serves, given what /v1/models shows the caller.
    unknown_model: Callable[[str | None, Sequence[str]], GatewayError] = unknown_model
    check_query: Callable[[str], None] = accept_any_query
    # The upstream body from the caller's; None sends the caller's bytes unchanged.
    build_body: Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]] | None = None
    usage_in_answer: Callable[[Mapping[str, Any]], dict[str, Any] | None] = chat_usage
    usage_in_event: Callable[[bytes], dict[str, Any] | None] = usage_in
    # May the gateway ask Azure for a stream's usage event (`stream_options`)?
    adds_stream_usage: bool = True
    method: str = "POST"
    # False: the request has no body (GET, DELETE, cancel); `schema` is not used.
    reads_body: bool = True
    # The id sub-path after the operation, from the path's arguments: "{0}/input_items".
    item: str = ""
    # Is the caller's query string (less `api-version`, which is the deployment's) sent on?
    passes_query: bool = False
    may_stream: bool = True
    ends_stream: Callable[[bytes], bool] = is_done
    # Set: the usage is read from the answer's bytes, which are then not parsed.
    usage_in_body: Callable[[bytes], dict[str, Any] | None] | None = None
    # The stored response a request is tied to (gateway/policy/affinity.py) ...
    held_response: Callable[[Mapping[str, Any], tuple[str, ...]], str | None] | None = None
    # ... and whether a stored response it creates is recorded there.
    records_response: bool = False
    # How the upstream body's tokens are estimated at admission (gateway/policy/estimate.py).
    estimate_as: Operation = "chat"


GPT_CHAT = Face(
    route="gpt_chat",
    operation=CHAT_COMPLETIONS,
    schema="gpt_chat.schema.json",
    model=no_model,
    build_body=build_gpt_chat_body,
    render_error=render_envelope,
    stream_error=envelope_event,
    wrap_success=in_success_envelope,
    content_type=JSON_UTF8,
)

OPENAI_CHAT = Face(
    route="chat_completions",
    operation=CHAT_COMPLETIONS,
    schema="chat_completions.schema.json",
    model=model_in_body,
    render_error=render_openai_error,
    stream_error=openai_error_event,
    wrap_success=as_sent,
    content_type=JSON,
)

# What `AzureOpenAI(azure_endpoint=<this server>)` calls. The SDK leaves
# `model` in the body too; Azure ignores it, and so do we: the path names
# the deployment.
AZURE_CHAT = Face(
    route="azure_chat_completions",
    operation=CHAT_COMPLETIONS,
    schema="chat_completions.schema.json",
    model=deployment_in_path,
    unknown_model=unknown_azure_deployment,
    check_query=require_api_version,
    render_error=render_openai_error,
    stream_error=openai_error_event,
    wrap_success=as_sent,
    content_type=JSON,
)

# The Responses API on `/v1/responses` and `/openai/v1/responses`. Its streams
# are relayed as they come: no `stream_options` (Azure refuses it there), no
# `[DONE]`; a stored response is followed by its deployment.
OPENAI_RESPONSES = Face(
    route="responses",
    operation=RESPONSES,
    schema="responses.schema.json",
    model=model_in_body,
    render_error=render_openai_error,
    stream_error=responses.error_event,
    wrap_success=as_sent,
    content_type=JSON,
    usage_in_answer=responses.usage_in_answer,
    usage_in_event=responses.usage_in_event,
    adds_stream_usage=False,
    passes_query=True,
    ends_stream=responses.ends_stream,
    held_response=previous_response,
    records_response=True,
    estimate_as="responses",
)
# GET and DELETE /responses/{id}, POST /responses/{id}/cancel, GET /responses/{id}/input_items.
OPENAI_RESPONSE_RETRIEVE = replace(
    OPENAI_RESPONSES,
    route="responses_retrieve",
    method="GET",
    reads_body=False,
    item="{0}",
    held_response=response_in_path,
    records_response=False,
    model=no_model,
)
# Only a retrieve streams (`?stream=true`: a background response's events again).
OPENAI_RESPONSE_DELETE = replace(
    OPENAI_RESPONSE_RETRIEVE, route="responses_delete", method="DELETE", may_stream=False
)
OPENAI_RESPONSE_CANCEL = replace(
    OPENAI_RESPONSE_RETRIEVE,
    route="responses_cancel",
    method="POST",
    item="{0}/cancel",
    may_stream=False,
)
OPENAI_RESPONSE_INPUT_ITEMS = replace(
    OPENAI_RESPONSE_RETRIEVE,
    route="responses_input_items",
    item="{0}/input_items",
    may_stream=False,
)
OPENAI_RESPONSES_FACES = (
    OPENAI_RESPONSES,
    OPENAI_RESPONSE_RETRIEVE,
    OPENAI_RESPONSE_DELETE,
    OPENAI_RESPONSE_CANCEL,
    OPENAI_RESPONSE_INPUT_ITEMS,
)
# What `AzureOpenAI(azure_endpoint=<this server>)` calls for Responses:
# `/openai/responses?api-version=...`, not deployment-scoped, `model` in the body.
AZURE_RESPONSES_FACES = tuple(
    replace(face, route="azure_" + face.route, check_query=require_api_version)
    for face in OPENAI_RESPONSES_FACES
)
(
    AZURE_RESPONSES,
    AZURE_RESPONSE_RETRIEVE,
    AZURE_RESPONSE_DELETE,
    AZURE_RESPONSE_CANCEL,
    AZURE_RESPONSE_INPUT_ITEMS,
) = AZURE_RESPONSES_FACES

# Embeddings: no stream; the answer may be tens of MB, so only its usage is read.
OPENAI_EMBEDDINGS = Face(
    route="embeddings",
    operation=EMBEDDINGS,
    schema="embeddings.schema.json",
    model=model_in_body,
    render_error=render_openai_error,
    stream_error=openai_error_event,
    wrap_success=as_sent,
    content_type=JSON,
    may_stream=False,
    usage_in_body=embeddings.usage_in_body,
    estimate_as="embeddings",
)
AZURE_EMBEDDINGS = replace(
    OPENAI_EMBEDDINGS,
    route="azure_embeddings",
    model=deployment_in_path,
    unknown_model=unknown_azure_deployment,
    check_query=require_api_version,
)

FACES = (
    GPT_CHAT,
    OPENAI_CHAT,
    AZURE_CHAT,
    *OPENAI_RESPONSES_FACES,
    *AZURE_RESPONSES_FACES,
    OPENAI_EMBEDDINGS,
    AZURE_EMBEDDINGS,
)
