"""Embeddings through the gateway, with the official `openai` SDK as the client."""

from __future__ import annotations

import math

import openai
import pytest

from gateway.embeddings import usage_in_body

from .conftest import API_VERSION, DEPLOYMENT, EMULATOR_KEY
from .support.deployments import write_deployments_file
from .support.metrics import sample, samples

TPM_KEY = "embedding-caller-key-4410"


def client_of(gateway, base: str = "/v1", key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + base, api_key=key, max_retries=0)


@pytest.mark.gen_test
async def test_a_string_a_list_dimensions_and_both_encodings(gateway):
    async with client_of(gateway) as client:
        one = await client.embeddings.create(model=DEPLOYMENT, input="hello vectors")
        # The SDK asks for base64 unless told otherwise, and decodes it itself.
        assert gateway.emulator.requests[-1].json["encoding_format"] == "base64"
        assert len(one.data) == 1 and len(one.data[0].embedding) > 0
        batch = await client.embeddings.create(
            model=DEPLOYMENT, input=["a", "bb", "hello vectors"], dimensions=8
        )
        assert gateway.emulator.requests[-1].json["dimensions"] == 8
        assert [len(item.embedding) for item in batch.data] == [8, 8, 8]
        floats = await client.embeddings.create(
            model=DEPLOYMENT, input="hello vectors", encoding_format="float"
        )
        tokens = await client.embeddings.create(model=DEPLOYMENT, input=[[1, 2, 3]])
    assert gateway.emulator.requests[-1].json["input"] == [[1, 2, 3]]
    assert tokens.usage.prompt_tokens == 3
    assert floats.data[0].embedding == pytest.approx(one.data[0].embedding, rel=1e-6)
    assert gateway.emulator.requests[-1].path == f"/openai/deployments/{DEPLOYMENT}/embeddings"

    metrics = samples((await gateway.get("/metrics")).body)
    prompt = sample(
        metrics, "gateway_tokens_total", key="anonymous", deployment=DEPLOYMENT, kind="prompt"
    )
    assert prompt == sum(e.usage.prompt_tokens for e in (one, batch, floats, tokens))


@pytest.mark.gen_test
async def test_azures_bytes_come_back_unchanged(gateway):
    for encoding in ("float", "base64"):
        response = await gateway.post(
            "/v1/embeddings",
            {"model": DEPLOYMENT, "input": ["x", "y"], "encoding_format": encoding},
        )
        assert response.code == 200
        assert response.body == gateway.emulator.requests[-1].response_body


@pytest.mark.gen_test
async def test_the_azure_client_calls_the_deployment_path(gateway):
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=gateway.url, api_key="unused", api_version=API_VERSION, max_retries=0
    ) as client:
        answer = await client.embeddings.create(model=DEPLOYMENT, input="azure style")
    received = gateway.emulator.requests[-1]
    assert received.path == f"/openai/deployments/{DEPLOYMENT}/embeddings"
    assert received.query == {"api-version": API_VERSION}
    assert received.operation == "embeddings"
    assert answer.usage.prompt_tokens > 0


@pytest.mark.gen_test
async def test_a_bad_embeddings_body_is_our_400(gateway):
    async with client_of(gateway) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.embeddings.create(model=DEPLOYMENT, input="x", dimensions=0)
    assert raised.value.body["param"] == "dimensions"
    assert all(r.operation != "embeddings" for r in gateway.emulator.requests)


@pytest.mark.gen_test
async def test_embedding_tokens_count_against_the_keys_tpm(tmp_path, emulator, start_gateway):
    path = write_deployments_file(
        tmp_path,
        [
            {
                "name": "main",
                "endpoint": emulator.url,
                "deployment": DEPLOYMENT,
                "api_version": API_VERSION,
                "key": EMULATOR_KEY,
            }
        ],
        keys=[{"name": "embedder", "key": TPM_KEY, "tpm": 45}],
    )
    gateway = start_gateway(DEPLOYMENTS_FILE=path)
    words = "one two three four five six seven eight nine ten eleven"
    async with client_of(gateway, key=TPM_KEY) as client:
        # Admission charges the estimate (it errs high: 19 tokens for these 11 words)
        # and the answer corrects it to Azure's count (11): three fit in 45, a fourth not.
        for _ in range(3):
            answer = await client.embeddings.create(model=DEPLOYMENT, input=words)
            assert answer.usage.prompt_tokens == 11
        with pytest.raises(openai.RateLimitError) as raised:
            await client.embeddings.create(model=DEPLOYMENT, input=words)
    headers = raised.value.response.headers
    assert int(headers["Retry-After"]) == math.ceil(int(headers["retry-after-ms"]) / 1000)
    assert raised.value.code == "rate_limit_exceeded"
    assert "tokens" in raised.value.message


def test_usage_is_found_without_parsing_the_answer():
    vectors = ",".join(f'{{"object":"embedding","index":{i},"embedding":"AAAA"}}' for i in range(3))
    body = f'{{"object":"list","data":[{vectors}],"usage":{{"prompt_tokens":7,"total_tokens":7}}}}'
    assert usage_in_body(body.encode()) == {"prompt_tokens": 7, "total_tokens": 7}
    first = '{"usage": {"prompt_tokens": 2, "total_tokens": 2}, "data": [[0.5, 1.5]]}'
    assert usage_in_body(first.encode()) == {"prompt_tokens": 2, "total_tokens": 2}
    assert usage_in_body(b'{"data":[]}') is None
    assert usage_in_body(b'{"usage":null}') is None
