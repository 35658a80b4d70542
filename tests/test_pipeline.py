"""gateway/pipeline.py driven without sockets: a scripted upstream in place of Azure.

What the end-to-end tests show over real sockets, here for the pipeline's
own decisions: which deployment each attempt goes to, what failover does
with each failure, what is accounted (quota, usage report, metrics) and
what a stream's caller receives.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tornado.httputil import HTTPHeaders

from gateway.config import Settings
from gateway.errors import GatewayError, map_upstream_status
from gateway.faces import FACES, GPT_CHAT, OPENAI_CHAT, Face
from gateway.ops.metrics import Metrics
from gateway.pipeline import Inbound, Pipeline, RequestRecord
from gateway.policy.deployments import Deployment
from gateway.policy.estimate import TokenEstimator
from gateway.policy.failover import DeploymentPool, Failover
from gateway.policy.keys import CallerKey, KeyRing
from gateway.policy.quota import MemoryQuota
from gateway.secret import Secret
from gateway.upstream.client import UpstreamCall, UpstreamResponse, UpstreamTarget
from gateway.validation import BodyValidator, load_registry

from .support.bodies import chat
from .support.metrics import sample, samples
from .support.sse import parse_events

T0 = 29_000_000 * 60.0 + 10
ALICE = CallerKey(name="alice", key=Secret("sk-alice-pipeline-1"), rpm=2)
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def deployment(name: str, weight: float) -> Deployment:
    return Deployment(
        name=name,
        endpoint=f"https://{name}.example.com",
        deployment="gpt-4o",
        api_version="2024-10-21",
        key=Secret(f"azure-key-{name}"),
        weight=weight,
        models=("gpt-4o",),
    )


# "a" is all but certain to be chosen first.
A, B = deployment("a", 1_000_000), deployment("b", 0.001)


def answer(document: Mapping[str, Any]) -> UpstreamResponse:
    body = json.dumps(document).encode()
    return UpstreamResponse(200, HTTPHeaders({"apim-request-id": "apim-1"}), body, dict(document))


def event(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode())


class ScriptedStream:
    """Events handed out in the steps given; then a failure, if one is given."""

    def __init__(self, steps: list[list[bytes]], failure: GatewayError | None = None) -> None:
        self.headers = HTTPHeaders({"x-ms-region": "Sweden Central"})
        self.steps = steps
        self.failure = failure
        self.closed = False

    async def _events(self) -> AsyncIterator[list[bytes]]:
        for step in self.steps:
            yield [item + b"\n\n" for item in step]
        if self.failure is not None:
            raise self.failure

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._events()

    def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedUpstream:
    """Stands in for UpstreamClient: each deployment's outcomes, in order."""

    outcomes: dict[str, list[Any]]
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def _next(self, deployment: Deployment, body: bytes) -> Any:
        self.calls.append((deployment.name, json.loads(body)))
        outcome = self.outcomes[deployment.name].pop(0)
        if isinstance(outcome, GatewayError):
            raise outcome
        return outcome

    async def complete(
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        **options: Any,
    ) -> UpstreamResponse | None:
        return self._next(deployment, body or b"null")

    async def open_stream(
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        **options: Any,
    ) -> ScriptedStream | None:
        return self._next(deployment, body or b"null")

    def close(self) -> None:
        pass


def rate_limited() -> GatewayError:
    return map_upstream_status(
        429, {"retry-after-ms": "30000"}, b'{"error":{"code":"429"}}', max_cooldown=60
    )


def content_filtered() -> GatewayError:
    return map_upstream_status(
        400, {}, b'{"error":{"code":"content_filter","message":"no"}}', max_cooldown=60
    )


def make_pipeline(upstream: ScriptedUpstream, *keys: CallerKey) -> Pipeline:
    settings = Settings(deployments=(A, B), caller_keys=keys)
    registry = load_registry()
    return Pipeline(
        settings=settings,
        upstream=upstream,
        failover=Failover(
            DeploymentPool(settings.deployments, max_cooldown=60, rng=random.Random(7)),
            max_attempts=3,
            max_retry_wait=0,
        ),
        validators={face.schema: BodyValidator(face.schema, registry) for face in FACES},
        keyring=KeyRing(keys),
        quota=MemoryQuota(clock=lambda: T0),
        metrics=Metrics(CollectorRegistry()),
        estimator=TokenEstimator(),
    )


def inbound(body: Mapping[str, Any], key: CallerKey | None = None) -> Inbound:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["api-key"] = key.key.reveal()
    return Inbound(request_id="req-1", headers=headers, body=raw, body_size=len(raw))


async def run(
    pipeline: Pipeline, face: Face, body: Mapping[str, Any], key: CallerKey | None = None
) -> tuple[Any, RequestRecord]:
    record = RequestRecord()
    return await pipeline.run(face, inbound(body, key), record), record


def metric(pipeline: Pipeline, name: str, **labels: str) -> float:
    exposition, _ = pipeline.metrics.render()
    return sample(samples(exposition), name, **labels)


@pytest.mark.gen_test
async def test_a_rate_limited_deployment_fails_over_and_the_answer_is_accounted():
    upstream = ScriptedUpstream({"a": [rate_limited()], "b": [answer({"id": "x", "usage": USAGE})]})
    pipeline = make_pipeline(upstream, ALICE)

    result, record = await run(pipeline, OPENAI_CHAT, chat("hello"), ALICE)

    assert [name for name, _ in upstream.calls] == ["a", "b"]
    assert json.loads(result.body) == {"id": "x", "usage": USAGE}
    assert result.headers == {"Content-Type": "application/json"}
    assert record.deployment == B and record.attempts == 2
    assert record.headers["x-upstream-attempts"] == "2"
    assert record.headers["x-ratelimit-remaining-requests"] == "1"
    assert record.apim_request_id == "apim-1" and record.usage == USAGE
    assert await pipeline.quota.usage_report() == {
        "keys": {
            "alice": {
                "b": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 5, "cost_usd": 0.0}
            }
        }
    }
    assert metric(pipeline, "gateway_upstream_attempts_total", deployment="a", outcome="429") == 1
    assert metric(pipeline, "gateway_upstream_attempts_total", deployment="b", outcome="ok") == 1
    assert metric(pipeline, "gateway_tokens_total", key="alice", deployment="b", kind="prompt") == 3

    # "a" rests: the next request goes to "b" at once.
    upstream.outcomes["b"].append(answer({"id": "y"}))
    await run(pipeline, OPENAI_CHAT, chat("again"), ALICE)
    assert [name for name, _ in upstream.calls] == ["a", "b", "b"]


@pytest.mark.gen_test
async def test_a_failure_that_is_not_retryable_is_the_answer_and_nothing_is_accounted():
    upstream = ScriptedUpstream({"a": [content_filtered()], "b": []})
    pipeline = make_pipeline(upstream)
    record = RequestRecord()
    with pytest.raises(GatewayError) as caught:
        await pipeline.run(OPENAI_CHAT, inbound(chat("bad")), record)
    assert (caught.value.status, caught.value.code) == (400, "content_filter")
    assert [name for name, _ in upstream.calls] == ["a"]
    assert record.upstream_status == 400
    assert await pipeline.quota.usage_report() == {"keys": {}}


@pytest.mark.gen_test
async def test_over_quota_is_429_before_any_attempt():
    upstream = ScriptedUpstream({"a": [answer({}), answer({})], "b": []})
    pipeline = make_pipeline(upstream, ALICE)
    for _ in range(2):
        await run(pipeline, OPENAI_CHAT, chat("hi"), ALICE)
    with pytest.raises(GatewayError) as caught:
        await run(pipeline, OPENAI_CHAT, chat("hi"), ALICE)
    assert (caught.value.status, caught.value.code) == (429, "rate_limit_exceeded")
    assert len(upstream.calls) == 2
    assert metric(pipeline, "gateway_quota_rejections_total", key="alice", limit="requests") == 1


@pytest.mark.gen_test
async def test_the_original_face_builds_its_body_and_wraps_the_answer():
    upstream = ScriptedUpstream({"a": [answer({"id": "x"})], "b": []})
    result, _ = await run(make_pipeline(upstream), GPT_CHAT, {"prompt": "hi", "temperature": 0.5})
    assert upstream.calls[0][1] == {
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
    }
    assert json.loads(result.body) == {"success": 1, "id": "x"}


@pytest.mark.gen_test
async def test_an_unknown_model_is_the_faces_404_and_azure_is_not_called():
    upstream = ScriptedUpstream({"a": [], "b": []})
    with pytest.raises(GatewayError) as caught:
        await run(make_pipeline(upstream), OPENAI_CHAT, chat("hi", model="nope"))
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    assert upstream.calls == []


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.mark.gen_test
async def test_a_stream_drops_the_usage_event_it_asked_for_and_is_accounted_at_its_end():
    stream = ScriptedStream(
        [
            [event({"choices": [{"delta": {"content": "Hi"}}], "usage": None})],
            [event({"choices": [], "usage": USAGE}), event(b"[DONE]")],
        ]
    )
    upstream = ScriptedUpstream({"a": [rate_limited()], "b": [stream]})
    pipeline = make_pipeline(upstream, ALICE)

    result, record = await run(pipeline, OPENAI_CHAT, chat("hi", stream=True), ALICE)
    assert upstream.calls[1][1]["stream_options"] == {"include_usage": True}
    assert result.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert record.headers["x-ms-region"] == "Sweden Central"
    assert await pipeline.quota.usage_report() == {"keys": {}}  # not until the stream ends

    events = parse_events(await collect(result.stream))
    assert events == [b'{"choices": [{"delta": {"content": "Hi"}}], "usage": null}', b"[DONE]"]
    assert record.usage == USAGE and stream.closed
    report = await pipeline.quota.usage_report()
    assert report["keys"]["alice"]["b"]["completion_tokens"] == 5
    assert metric(pipeline, "gateway_streams_in_flight") == 0


@pytest.mark.gen_test
async def test_a_stream_that_fails_after_its_start_ends_with_the_faces_error_event():
    failure = GatewayError(502, "stream_interrupted", "cut")
    stream = ScriptedStream([[event({"choices": []})]], failure)
    upstream = ScriptedUpstream({"a": [stream], "b": []})
    result, _ = await run(make_pipeline(upstream), GPT_CHAT, {"prompt": "hi", "stream": True})
    events = parse_events(await collect(result.stream))
    assert json.loads(events[-1]) == {
        "success": 0,
        "message": "cut",
        "error": {
            "code": "stream_interrupted",
            "message": "cut",
            "type": "upstream_error",
            "param": None,
        },
    }
    assert len(upstream.calls) == 1  # no failover once events went out


@pytest.mark.gen_test
async def test_a_caller_who_asked_for_usage_gets_the_event():
    stream = ScriptedStream([[event({"choices": [], "usage": USAGE}), event(b"[DONE]")]])
    upstream = ScriptedUpstream({"a": [stream], "b": []})
    body = chat("hi", stream=True, stream_options={"include_usage": True})
    result, record = await run(make_pipeline(upstream), OPENAI_CHAT, body)
    assert len(parse_events(await collect(result.stream))) == 2
    assert record.usage == USAGE
