"""What the tracing hooks cost a request when tracing is off: the request path without sockets.

    .venv/bin/python bench/tracing_cost.py            # this tree
    .venv/bin/python bench/tracing_cost.py --tracing  # with spans, to a collector nobody runs

Runs requests through `Pipeline.run` (key check, JSON, schema, quota,
failover plan, usage accounting, metrics) over an in-process upstream that
answers at once, and does what the handler and the access-log hook do for
tracing: start the request's trace and end it. Prints the CPU microseconds
per request (median of the rounds) for a non-stream answer and a 20-event
stream. Run it on a tree without the hooks (it needs no tracer there) for
the figure to compare with; bench/README.md "Tracing off" has both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402
from tornado.httputil import HTTPHeaders  # noqa: E402

from gateway.config import Settings  # noqa: E402
from gateway.faces import FACES, OPENAI_CHAT  # noqa: E402
from gateway.ops.metrics import Metrics  # noqa: E402
from gateway.pipeline import Inbound, Pipeline, RequestRecord  # noqa: E402
from gateway.policy.deployments import Deployment  # noqa: E402
from gateway.policy.estimate import TokenEstimator  # noqa: E402
from gateway.policy.failover import DeploymentPool, Failover  # noqa: E402
from gateway.policy.keys import CallerKey, KeyRing  # noqa: E402
from gateway.policy.quota import MemoryQuota  # noqa: E402
from gateway.secret import Secret  # noqa: E402
from gateway.upstream.client import UpstreamResponse, api_key_auth  # noqa: E402
from gateway.validation import BodyValidator, load_registry  # noqa: E402

KEY = "sk-bench-tracing-1"
DEPLOYMENT = Deployment(
    name="bench",
    endpoint="https://bench.example.com",
    deployment="gpt-4o",
    api_version="2024-10-21",
    key=Secret("azure-key"),
    models=("gpt-4o",),
)
USAGE = {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}
ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ],
    "usage": USAGE,
}


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


STREAM = [
    [chunk({"role": "assistant", "content": ""})],
    *([chunk({"content": f" word{i}"})] for i in range(20)),
    [chunk({}, "stop")],
    [b'data: {"id":"chatcmpl-bench","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"],
    [b"data: [DONE]\n\n"],
]


class Events:
    headers = HTTPHeaders({"apim-request-id": "apim-bench"})

    async def _steps(self) -> AsyncIterator[list[bytes]]:
        for step in STREAM:
            yield step

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._steps()

    def close(self) -> None:
        pass


class InstantUpstream:
    body = json.dumps(ANSWER).encode()

    async def complete(self, deployment: Any, target: Any, body: Any, call: Any, **_: Any) -> Any:
        return UpstreamResponse(
            200, HTTPHeaders({"apim-request-id": "apim-bench"}), self.body, ANSWER
        )

    async def open_stream(
        self, deployment: Any, target: Any, body: Any, call: Any, **_: Any
    ) -> Any:
        return Events()

    def auth_of(self, deployment: Any) -> Any:
        return api_key_auth(deployment)

    def close(self) -> None:
        pass


def build(tracing: bool) -> Pipeline:
    registry = load_registry()
    settings = Settings(
        deployments=(DEPLOYMENT,), stream_keepalive=float(__import__("os").environ.get("KA", "15"))
    )
    extra: dict[str, Any] = {}
    if tracing:
        from gateway.ops.tracing import load_tracing_settings, start_tracing

        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        extra["tracer"] = start_tracing(load_tracing_settings(endpoint))
    return Pipeline(
        settings=settings,
        upstream=InstantUpstream(),
        failover=Failover(
            DeploymentPool(settings.deployments, max_cooldown=60),
            max_attempts=3,
            max_retry_wait=0,
        ),
        validators={face.schema: BodyValidator(face.schema, registry) for face in FACES},
        keyring=KeyRing([CallerKey(name="bench", key=Secret(KEY), rpm=10**9)]),
        quota=MemoryQuota(),
        metrics=Metrics(CollectorRegistry()),
        estimator=TokenEstimator({}),
        **extra,
    )


async def one_request(pipeline: Pipeline, body: bytes, headers: HTTPHeaders) -> None:
    """What ApiHandler and the access-log hook do around `Pipeline.run`."""
    inbound = Inbound(request_id="req-bench", headers=headers, body=body, body_size=len(body))
    tracer = pipeline.tracer
    trace = tracer.request("POST", "/v1/chat/completions" if tracer.enabled else "", headers)
    record = RequestRecord(headers={"x-request-id": "req-bench"}, trace=trace)
    answer = await pipeline.run(OPENAI_CHAT, inbound, record)
    if answer.stream is not None:
        async for _ in answer.stream:
            pass
    record.trace.set_key("bench")
    record.trace.set_request_id("req-bench")
    record.trace.end(200, error_type=record.error_code)


async def measure(pipeline: Pipeline, stream: bool, requests: int, rounds: int) -> float:
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    ).encode()
    headers = HTTPHeaders({"Content-Type": "application/json", "api-key": KEY})
    for _ in range(requests // 10):  # warm up
        await one_request(pipeline, body, headers)
    per_request = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            await one_request(pipeline, body, headers)
        per_request.append((time.process_time() - started) / requests * 1e6)
    return statistics.median(per_request)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracing", action="store_true", help="tracing on (spans are dropped)")
    parser.add_argument("--requests", type=int, default=5000, help="per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    pipeline = build(args.tracing)
    for stream in (False, True):
        cost = await measure(pipeline, stream, args.requests, args.rounds)
        kind = "20-event stream" if stream else "non-stream"
        print(f"{kind:16} {cost:8.1f} µs CPU per request (median of {args.rounds} rounds)")
    if args.tracing:
        pipeline.tracer.shutdown(timeout=0.5)


if __name__ == "__main__":
    asyncio.run(main())
