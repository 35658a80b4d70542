"""gateway/upstream/urls.py: every upstream URL, for each style of api_version."""

from __future__ import annotations

import pytest

from gateway.policy.deployments import Deployment
from gateway.secret import Secret
from gateway.upstream.urls import names_model_in_body, upstream_url


def deployment(api_version: str) -> Deployment:
    return Deployment(
        name="east",
        endpoint="https://east.openai.azure.com",
        deployment="gpt-4o",
        api_version=api_version,
        key=Secret("k"),
    )


@pytest.mark.parametrize(
    ("api_version", "operation", "options", "url"),
    [
        (
            "2024-10-21",
            "chat/completions",
            {},
            "https://east.openai.azure.com/openai/deployments/gpt-4o/chat/completions"
            "?api-version=2024-10-21",
        ),
        (
            "2025-03-01-preview",
            "embeddings",
            {"query": "x=1"},
            "https://east.openai.azure.com/openai/deployments/gpt-4o/embeddings"
            "?api-version=2025-03-01-preview&x=1",
        ),
        ("v1", "chat/completions", {}, "https://east.openai.azure.com/openai/v1/chat/completions"),
        (
            "v1",
            "responses",
            {"item": "resp_1/input_items", "query": "limit=2&order=asc"},
            "https://east.openai.azure.com/openai/v1/responses/resp_1/input_items?limit=2&order=asc",
        ),
        (
            "preview",
            "responses",
            {"item": "resp 1"},
            "https://east.openai.azure.com/openai/v1/responses/resp%201?api-version=preview",
        ),
        (
            "2025-04-01-preview",
            "responses",
            {"item": "resp_1"},
            "https://east.openai.azure.com/openai/responses/resp_1?api-version=2025-04-01-preview",
        ),
    ],
)
def test_upstream_url(api_version, operation, options, url):
    assert upstream_url(deployment(api_version), operation, **options) == url


@pytest.mark.parametrize(
    ("api_version", "operation", "in_body"),
    [
        ("v1", "chat/completions", True),
        ("preview", "embeddings", True),
        ("2024-10-21", "chat/completions", False),
        ("2024-10-21", "embeddings", False),
        ("2025-04-01-preview", "responses", True),
    ],
)
def test_the_body_names_the_deployment_where_the_url_does_not(api_version, operation, in_body):
    assert names_model_in_body(deployment(api_version), operation) is in_body
