"""The emulator's embeddings, driven by the official `openai` SDK over real sockets."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import openai
import pytest
from tornado.httpclient import AsyncHTTPClient

from emulator import AzureEmulator, Fault
from emulator.embeddings import embedding_vector

from .conftest import API_VERSION, DEPLOYMENT, EMULATOR_KEY

FULL = 1536


def v1_client(emulator: AzureEmulator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=emulator.url + "/openai/v1/", api_key=EMULATOR_KEY, max_retries=0
    )


@pytest.fixture
def http(io_loop: Any) -> Any:
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


async def post(
    http: AsyncHTTPClient, emulator: AzureEmulator, body: Any, path: str = "/openai/v1/embeddings"
):
    response = await http.fetch(
        emulator.url + path,
        method="POST",
        body=json.dumps(body),
        raise_error=False,
        headers={"api-key": EMULATOR_KEY, "Content-Type": "application/json"},
    )
    return response.code, json.loads(response.body)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


@pytest.mark.gen_test
async def test_string_and_list_inputs_get_deterministic_unit_vectors(emulator):
    async with v1_client(emulator) as client:
        one = await client.embeddings.create(model=DEPLOYMENT, input="hello embedding world")
        many = await client.embeddings.create(
            model=DEPLOYMENT, input=["hello embedding world", "other", "a b"]
        )
    [only] = one.data
    assert (only.index, only.object, len(only.embedding)) == (0, "embedding", FULL)
    assert math.isclose(norm(only.embedding), 1.0, rel_tol=1e-5)
    assert one.model == emulator.embedding_model and one.object == "list"
    assert (one.usage.prompt_tokens, one.usage.total_tokens) == (3, 3)
    assert [item.index for item in many.data] == [0, 1, 2]
    assert many.data[0].embedding == only.embedding  # same input, same vector
    assert many.data[1].embedding != only.embedding
    assert many.data[2].embedding == embedding_vector("a b", FULL, FULL)
    assert many.usage.prompt_tokens == 3 + 1 + 2

    record = emulator.requests[0]
    assert (record.path, record.operation, record.deployment) == (
        "/openai/v1/embeddings",
        "embeddings",
        DEPLOYMENT,
    )
    assert record.json["encoding_format"] == "base64"  # what the SDK asks for by default


@pytest.mark.gen_test
async def test_base64_is_little_endian_float32_of_the_float_answer(emulator, http):
    code, as_float = await post(
        http, emulator, {"model": DEPLOYMENT, "input": "x", "encoding_format": "float"}
    )
    assert code == 200
    code, as_base64 = await post(
        http, emulator, {"model": DEPLOYMENT, "input": "x", "encoding_format": "base64"}
    )
    packed = base64.b64decode(as_base64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{FULL}f", packed)) == as_float["data"][0]["embedding"]
    async with v1_client(emulator) as client:
        decoded = await client.embeddings.create(model=DEPLOYMENT, input="x")
        floats = await client.embeddings.create(
            model=DEPLOYMENT, input="x", encoding_format="float"
        )
    assert decoded.data[0].embedding == floats.data[0].embedding == as_float["data"][0]["embedding"]


@pytest.mark.gen_test
async def test_dimensions_shorten_the_vector_to_unit_length(emulator):
    async with v1_client(emulator) as client:
        full = await client.embeddings.create(model=DEPLOYMENT, input="shorten me")
        short = await client.embeddings.create(model=DEPLOYMENT, input="shorten me", dimensions=256)
    vector = short.data[0].embedding
    assert len(vector) == 256 and math.isclose(norm(vector), 1.0, rel_tol=1e-5)
    scale = norm(full.data[0].embedding[:256])
    assert all(
        math.isclose(a, b / scale, rel_tol=1e-4, abs_tol=1e-7)
        for a, b in zip(vector, full.data[0].embedding, strict=False)
    )


@pytest.mark.gen_test
async def test_token_arrays_count_one_token_per_id(emulator, http):
    code, one = await post(
        http, emulator, {"model": DEPLOYMENT, "input": [1, 2, 3], "encoding_format": "float"}
    )
    assert code == 200 and len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    code, two = await post(
        http, emulator, {"model": DEPLOYMENT, "input": [[1, 2, 3], [9]], "encoding_format": "float"}
    )
    assert [item["index"] for item in two["data"]] == [0, 1] and two["usage"]["prompt_tokens"] == 4
    assert two["data"][0]["embedding"] == one["data"][0]["embedding"]


@pytest.mark.gen_test
async def test_dated_path_takes_the_deployment_from_the_path(emulator):
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=emulator.url, api_key=EMULATOR_KEY, api_version=API_VERSION, max_retries=0
    ) as client:
        answer = await client.embeddings.create(model=DEPLOYMENT, input="dated", dimensions=8)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.embeddings.create(model="no-such-deployment", input="dated")
    assert len(answer.data[0].embedding) == 8
    assert missing.value.code == "DeploymentNotFound"
    record = emulator.requests[0]
    assert (record.path, record.query) == (
        f"/openai/deployments/{DEPLOYMENT}/embeddings",
        {"api-version": API_VERSION},
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "x"}, "model"),
        ({"model": DEPLOYMENT}, "input"),
        ({"model": DEPLOYMENT, "input": ""}, "input"),
        ({"model": DEPLOYMENT, "input": []}, "input"),
        ({"model": DEPLOYMENT, "input": ["a", 1]}, "input"),
        ({"model": DEPLOYMENT, "input": [[1], []]}, "input"),
        ({"model": DEPLOYMENT, "input": ["x"] * 2049}, "input"),
        ({"model": DEPLOYMENT, "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": DEPLOYMENT, "input": "x", "dimensions": FULL + 1}, "dimensions"),
        ({"model": DEPLOYMENT, "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
@pytest.mark.gen_test
async def test_refused_bodies_name_the_field(emulator, http, body, param):
    code, answer = await post(http, emulator, body)
    assert (
        code == 400
        and answer["error"]["param"] == param
        and answer["error"]["type"] == "invalid_request_error"
    )


@pytest.mark.gen_test
async def test_faults_apply_to_embeddings(emulator, http):
    emulator.add_fault(Fault(kind="unavailable"))
    code, answer = await post(http, emulator, {"model": DEPLOYMENT, "input": "x"})
    assert code == 503 and answer["error"]["type"] == "server_error"
    code, _ = await post(http, emulator, {"model": DEPLOYMENT, "input": "x"})
    assert code == 200
