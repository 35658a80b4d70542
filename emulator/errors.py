"""The error bodies Azure answers with, and the exception that carries one to the client.

Every body is built afresh per call, so a test that edits one cannot change the next.
Shapes come from PROTOCOL.md section 5 and PROTOCOL-v1.md sections 6 and 9; where a
docstring says *inferred*, no source states the exact text.
"""

from __future__ import annotations

from tornado.httputil import responses
from tornado.web import HTTPError

DEFAULT_RETRY_AFTER = 1  # seconds, for a rate_limit fault that names none

ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within "
    "the last 5 minutes, please wait a moment and try again."
)
RATE_LIMITED = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
    "2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please "
    "retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease if you "
    "would like to further increase the default rate limit."
)
CONTENT_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry."
)

TOKEN_REFUSED = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)
PERMISSION_DENIED = "Principal does not have access to API/Operation."


class ErrorAnswer(HTTPError):
    """An HTTP error answered with exactly this JSON body and these extra headers."""

    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.body = body
        self.headers = headers or {}


def azure_error(status: int, *, seconds: int = DEFAULT_RETRY_AFTER) -> dict:
    """Return the body Azure answers `status` with (PROTOCOL.md section 5)."""
    server_error = {"type": "server_error", "param": None, "code": None}
    known = {
        400: invalid_request("The request is invalid.", None)["error"],
        401: {"code": "401", "message": ACCESS_DENIED},
        404: {"code": "404", "message": "Resource not found"},
        408: {"code": "Timeout", "message": "The operation was timeout."},
        429: {"code": "429", "message": RATE_LIMITED.format(seconds=seconds)},
        500: {
            "message": "The server had an error processing your request. Sorry about that!",
            **server_error,
        },
        503: {
            "message": "The service is temporarily unable to process your request.",
            **server_error,
        },
    }
    return {
        "error": known.get(status)
        or {"code": str(status), "message": responses.get(status, "Error")}
    }


def token_refused() -> dict:
    """Return Azure's 401 for a bearer token it cannot accept: no `error` envelope.

    PROTOCOL-v1.md section 2.1.
    """
    return {"statusCode": 401, "message": TOKEN_REFUSED}


def permission_denied() -> dict:
    """Return Azure's 401 for a valid token whose identity lacks the role (inject as a Fault)."""
    return {"error": {"code": "PermissionDenied", "message": PERMISSION_DENIED}}


def invalid_request(message: str, param: str | None, code: str | None = None) -> dict:
    """Return the OpenAI-style 400 body Azure uses for a body it cannot accept."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def bad_request(message: str, param: str | None, code: str | None = None) -> ErrorAnswer:
    return ErrorAnswer(400, invalid_request(message, param, code))


def resource_not_found() -> ErrorAnswer:
    """A path, or an api-version, this resource does not serve."""
    return ErrorAnswer(404, azure_error(404))


def deployment_not_found() -> ErrorAnswer:
    return ErrorAnswer(
        404, {"error": {"code": "DeploymentNotFound", "message": DEPLOYMENT_NOT_FOUND}}
    )


def response_not_found(response_id: str) -> ErrorAnswer:
    """A response id this resource does not hold (O#Error's 404 shape; the text is *inferred*)."""
    return ErrorAnswer(404, invalid_request(f"Response with id '{response_id}' not found.", None))


def previous_response_not_found(response_id: str) -> ErrorAnswer:
    """A `previous_response_id` this resource does not hold (PROTOCOL-v1.md section 6)."""
    message = f"Previous response with id '{response_id}' not found."
    return bad_request(message, "previous_response_id", "previous_response_not_found")


def model_not_found(model: str) -> ErrorAnswer:
    """GET /models/{model} for a name no deployment has (OpenAI's shape; *inferred*)."""
    message = f"The model '{model}' does not exist or you do not have access to it."
    return ErrorAnswer(404, invalid_request(message, "model", "model_not_found"))
