"""Every URL the gateway calls on Azure OpenAI is built here.

A deployment's `api_version` picks the URL style:

- a dated version (`2024-10-21`, `2025-03-01-preview`): the deployment is in
  the path and the version in the query,
  `{endpoint}/openai/deployments/{deployment}/{operation}?api-version={version}`,
  except for the Responses API, which is not deployment-scoped on dated
  versions either: `{endpoint}/openai/responses?api-version={version}`;
- `v1` or `preview`: Azure's v1 API, `{endpoint}/openai/v1/{operation}`
  (`?api-version=preview` for the preview).

Where the URL does not name the deployment, the body's `model` must
(`names_model_in_body`): the upstream body then carries the Azure deployment
name there, whatever name the caller asked for.

`operation` is the path after that prefix (`chat/completions`); `item` an
optional id sub-path (`resp_123/input_items`); `query` the caller's own query
string, passed on after ours.
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.policy.deployments import Deployment

V1_VERSIONS = frozenset({"v1", "preview"})
# Operations Azure addresses on the resource, not under a deployment, on dated versions too.
RESOURCE_SCOPED = frozenset({"responses"})


def uses_v1_paths(deployment: Deployment) -> bool:
    """True when the deployment is addressed through Azure's v1 API."""
    return deployment.api_version in V1_VERSIONS


def names_model_in_body(deployment: Deployment, operation: str) -> bool:
    """True when Azure learns the deployment from the body's `model`, not from the URL."""
    return uses_v1_paths(deployment) or operation in RESOURCE_SCOPED


def upstream_url(deployment: Deployment, operation: str, *, item: str = "", query: str = "") -> str:
    """The URL of `operation` (and `item`) on `deployment`, with `query` appended."""
    path = operation + (f"/{quote(item, safe='/')}" if item else "")
    if uses_v1_paths(deployment):
        url = f"{deployment.endpoint}/openai/v1/{path}"
        ours = "api-version=preview" if deployment.api_version == "preview" else ""
    elif operation in RESOURCE_SCOPED:
        url = f"{deployment.endpoint}/openai/{path}"
        ours = f"api-version={deployment.api_version}"
    else:
        url = f"{deployment.endpoint}/openai/deployments/{deployment.deployment}/{path}"
        ours = f"api-version={deployment.api_version}"
    parameters = "&".join(part for part in (ours, query) if part)
    return f"{url}?{parameters}" if parameters else url
