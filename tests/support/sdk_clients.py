"""The official `openai` SDK's two clients, pointed at a running gateway.

Tests parametrised with CLIENTS run once through the OpenAI-shaped routes
(`AsyncOpenAI`, base URL `<gateway>/v1`) and once through the Azure-shaped ones
(`AsyncAzureOpenAI`, the dated api-version), the way users' code reaches the gateway.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import API_VERSION

CALLER_KEY = "caller-key-never-forwarded-91"


def openai_client(gateway: Any, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=CALLER_KEY, **options)


def azure_client(gateway: Any, **options: Any) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=gateway.url, api_key=CALLER_KEY, api_version=API_VERSION, **options
    )


CLIENTS = pytest.mark.parametrize(
    "make_client", [openai_client, azure_client], ids=["openai", "azure"]
)
