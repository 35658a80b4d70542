"""make_app(settings): the core objects, the route table, and the application that serves them."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from tornado.web import Application

from gateway.config import Settings
from gateway.faces import AZURE_CHAT, FACES, GPT_CHAT, OPENAI_CHAT
from gateway.ops.accesslog import write_access_log
from gateway.ops.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.policy.failover import DeploymentPool, Failover
from gateway.policy.keys import KeyRing
from gateway.policy.quota import MemoryQuota, QuotaStore, RedisQuota
from gateway.upstream.client import UpstreamClient
from gateway.validation import BodyValidator, load_registry

from .api import ApiHandler, ModelsHandler
from .base import BaseHandler, NotFoundHandler
from .listeners import JsonOnlyGzip
from .ops import HealthHandler, MetricsHandler, ReadyHandler, UsageHandler
from .status import StatusHandler


def build_pipeline(settings: Settings, *, clock: Callable[[], float] = time.time) -> Pipeline:
    """Everything requests share, built once; `clock` is the quota windows' wall clock."""
    registry = load_registry()
    metrics = Metrics(CollectorRegistry())
    quota: QuotaStore
    if settings.redis_url:
        quota = RedisQuota(
            settings.redis_url.reveal(),
            settings.quota_on_redis_error,  # type: ignore[arg-type]
            on_redis_error=metrics.redis_errors_total.inc,
            clock=clock,
        )
    else:
        quota = MemoryQuota(clock=clock)
    pool = DeploymentPool(settings.deployments, max_cooldown=settings.max_cooldown)
    return Pipeline(
        settings=settings,
        upstream=UpstreamClient(settings),
        failover=Failover(
            pool, max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait
        ),
        validators={face.schema: BodyValidator(face.schema, registry) for face in FACES},
        keyring=KeyRing(settings.caller_keys),
        quota=quota,
        metrics=metrics,
    )


def make_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Application:
    """The application: its route table, over one pipeline.

    An API route is `(pattern, ApiHandler, {"face": FACE})`, the face
    defined in gateway/faces.py.
    """
    pipeline = build_pipeline(settings, clock=clock)

    def log_request(handler: BaseHandler) -> None:
        record = handler.access_record()
        write_access_log(record, settings.log_format)
        ttft_ms = record.get("ttft_ms")
        pipeline.metrics.count_request(
            record["route"],
            record["status"],
            record["duration_ms"] / 1000,
            None if ttft_ms is None else ttft_ms / 1000,
        )

    return Application(
        [
            (r"/v1/?", StatusHandler),
            (r"/v1/gpt/chat/?", ApiHandler, {"face": GPT_CHAT}),
            (r"/v1/chat/completions", ApiHandler, {"face": OPENAI_CHAT}),
            (r"/openai/deployments/([^/]+)/chat/completions", ApiHandler, {"face": AZURE_CHAT}),
            (r"/v1/models", ModelsHandler),
            (r"/v1/usage", UsageHandler),
            (r"/metrics", MetricsHandler),
            (r"/healthz", HealthHandler),
            (r"/readyz", ReadyHandler),
        ],
        default_handler_class=NotFoundHandler,
        transforms=[JsonOnlyGzip],
        pipeline=pipeline,
        log_function=log_request,
    )
