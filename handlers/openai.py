"""Routes shaped like OpenAI's and Azure's own, so the official SDKs work unchanged.

The caller's body goes upstream as the document the schema checked, encoded
once by the strict reader (gateway/jsonbody.py), except that a stream also
asks Azure for its usage event, which the caller then sees only if it
asked; Azure's JSON or event bytes come back
unchanged: no `success` field, errors in the `{"error": {...}}` shape the SDKs parse.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError, render_openai_error
from gateway.upstream import UpstreamResponse

from .base import BaseHandler
from .chat import ChatProxyHandler


class OpenAIErrorsMixin:
    """Errors in OpenAI's shape, for every route of this family."""

    def render_error(self, error: GatewayError) -> dict[str, Any]:
        return render_openai_error(error)


class OpenAIChatHandler(OpenAIErrorsMixin, ChatProxyHandler):
    """POST /v1/chat/completions: `model` picks the deployment."""

    route = "chat_completions"

    def upstream_body(self, request: dict[str, Any], *path_args: str) -> tuple[dict[str, Any], str | None]:
        self.context.validators["chat_completions"].validate(request)
        model = request.get("model")
        return request, model if isinstance(model, str) else None

    def write_completion(self, response: UpstreamResponse) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)

    def stream_error_payload(self, error: GatewayError) -> dict[str, Any]:
        return render_openai_error(error)


class AzureChatHandler(OpenAIChatHandler):
    """POST /openai/deployments/{deployment}/chat/completions?api-version=...

    What `AzureOpenAI(azure_endpoint=<this server>)` calls. The SDK leaves
    `model` in the body too; Azure ignores it, and so do we: the path names
    the deployment.
    """

    route = "azure_chat_completions"

    def upstream_body(self, request: dict[str, Any], *path_args: str) -> tuple[dict[str, Any], str | None]:
        if not self.get_query_argument("api-version", ""):
            raise GatewayError(
                404,
                "404",
                "Resource not found: the api-version query parameter is required.",
                param="api-version",
            )
        self.context.validators["chat_completions"].validate(request)
        return request, path_args[0]

    def unknown_model(self, model: str | None) -> GatewayError:
        # Azure's own answer for a deployment that does not exist.
        return GatewayError(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist.",
            param="deployment",
        )


class ModelsHandler(OpenAIErrorsMixin, BaseHandler):
    """GET /v1/models: the deployments this server serves, in OpenAI's list shape."""

    route = "models"

    def get(self) -> None:
        caller = self.context.keyring.authenticate(self.request.headers)
        allowed = caller.models if caller else None
        self.write_json(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "azure-gpt-api"}
                    for name in self.context.pool.model_names()
                    if allowed is None or name in allowed
                ],
            }
        )
