"""make_app(settings): the core objects, the route table, and the application that serves them."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from tornado.web import Application

from gateway import faces
from gateway.config import Settings
from gateway.faces import AZURE_CHAT, FACES, GPT_CHAT, OPENAI_CHAT
from gateway.ops.accesslog import write_access_log
from gateway.ops.admin import RecentRequests
from gateway.ops.deployment_metrics import DeploymentCapacityCollector
from gateway.ops.metrics import Metrics
from gateway.ops.tracing import start_tracing
from gateway.pipeline import Pipeline
from gateway.policy.affinity import AffinityStore, MemoryAffinity, RedisAffinity
from gateway.policy.callers import Callers
from gateway.policy.deployments import Deployment
from gateway.policy.estimate import TokenEstimator, load_cached_encodings
from gateway.policy.failover import DeploymentPool, Failover
from gateway.policy.keys import KeyRing
from gateway.policy.oidc import OidcIdentities, OidcIdentity, OidcVerifier
from gateway.policy.quota import MemoryQuota, QuotaStore, RedisQuota
from gateway.upstream.auth import TokenSources, UpstreamAuth
from gateway.upstream.client import UpstreamClient, api_key_auth
from gateway.validation import BodyValidator, load_registry

from .admin import AdminDeploymentsHandler, AdminRequestsHandler, AdminUsageHandler
from .api import ApiHandler, ModelsHandler
from .base import BaseHandler, NotFoundHandler
from .listeners import JsonOnlyGzip
from .ops import HealthHandler, MetricsHandler, ReadyHandler, UsageHandler
from .status import StatusHandler
from .webconsole import console_routes

# The longest read of an OIDC issuer's discovery document or JWKS.
OIDC_FETCH_TIMEOUT = 10.0


def build_pipeline(settings: Settings, *, clock: Callable[[], float] = time.time) -> Pipeline:
    """Everything requests share, built once; `clock` is the wall clock of the limits'
    windows and the budgets' days and months."""
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
    affinity: AffinityStore
    if settings.redis_url:
        affinity = RedisAffinity(
            settings.redis_url.reveal(),
            settings.response_affinity_ttl,
            on_redis_error=metrics.redis_errors_total.inc,
        )
    else:
        affinity = MemoryAffinity(settings.response_affinity_ttl)
    pool = DeploymentPool(
        settings.deployments,
        max_cooldown=settings.max_cooldown,
        least_busy=settings.routing == "least-busy",
        on_spill=lambda first_priority, chosen: metrics.count_spill(chosen.name, chosen.priority),
    )
    metrics.add_collector(DeploymentCapacityCollector(pool.board))
    encodings = (
        load_cached_encodings(settings.tiktoken_cache_dir) if settings.tiktoken_cache_dir else {}
    )
    credentials = TokenSources(
        on_acquired=metrics.count_token_acquired, on_failed=metrics.count_token_failed
    )
    upstream = UpstreamClient(settings, lambda deployment: deployment_auth(deployment, credentials))
    keyring = KeyRing(settings.caller_keys)
    return Pipeline(
        settings=settings,
        upstream=upstream,
        failover=Failover(
            pool, max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait
        ),
        validators={face.schema: BodyValidator(face.schema, registry) for face in FACES},
        keyring=keyring,
        quota=quota,
        metrics=metrics,
        affinity=affinity,
        estimator=TokenEstimator(
            encodings, default_completion_tokens=settings.default_completion_tokens
        ),
        callers=build_callers(settings, keyring, upstream, metrics),
        credentials=credentials,
        tracer=start_tracing(settings.tracing, on_dropped=metrics.count_dropped_spans),
    )


def deployment_auth(deployment: Deployment, credentials: TokenSources) -> UpstreamAuth:
    """The deployment's Entra identity's token, shared with others of that identity, or its key."""
    if deployment.entra is not None:
        return credentials.auth(deployment.entra)
    return api_key_auth(deployment)


def build_callers(
    settings: Settings, keyring: KeyRing, upstream: UpstreamClient, metrics: Metrics
) -> Callers:
    """The caller check: the keys, and callers' OIDC tokens when AUTH_OIDC_ISSUER is set."""
    if settings.auth_oidc_issuer is None or settings.auth_oidc_audience is None:
        return Callers(keyring)
    verifier = OidcVerifier(
        settings.auth_oidc_issuer,
        settings.auth_oidc_audience,
        lambda url: upstream.get_json(url, OIDC_FETCH_TIMEOUT),
        on_reject=metrics.count_jwt_rejection,
    )
    identities = OidcIdentities(
        (OidcIdentity(key.name, key.oidc) for key in settings.caller_keys if key.oidc),
        settings.auth_oidc_default_key,
    )
    return Callers(keyring, verifier, identities)


RESPONSE = r"/responses/([^/]+)"


def responses_routes(base: str, family: tuple[faces.Face, ...]) -> list[tuple]:
    """The Responses API under `base`: create, then by id (retrieve and delete share a path)."""
    create, retrieve, delete, cancel, input_items = family
    return [
        (base + "/responses", ApiHandler, {"face": create}),
        (base + RESPONSE, ApiHandler, {"face": retrieve, "delete_face": delete}),
        (base + RESPONSE + "/cancel", ApiHandler, {"face": cancel}),
        (base + RESPONSE + "/input_items", ApiHandler, {"face": input_items}),
    ]


def make_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Application:
    """The application: its route table, over one pipeline.

    An API route is `(pattern, ApiHandler, {"face": FACE})`, the face
    defined in gateway/faces.py.
    """
    pipeline = build_pipeline(settings, clock=clock)
    # The console's recent requests: API requests' access records, never a prompt.
    recent = RecentRequests()

    def log_request(handler: BaseHandler) -> None:
        record = handler.access_record()
        write_access_log(record, settings.log_format)
        if isinstance(handler, ApiHandler):
            recent.add(record)
            handler.end_trace(record)
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
            (r"/openai/v1/chat/completions", ApiHandler, {"face": OPENAI_CHAT}),
            *responses_routes("/v1", faces.OPENAI_RESPONSES_FACES),
            *responses_routes("/openai/v1", faces.OPENAI_RESPONSES_FACES),
            *responses_routes("/openai", faces.AZURE_RESPONSES_FACES),
            (r"/v1/embeddings", ApiHandler, {"face": faces.OPENAI_EMBEDDINGS}),
            (r"/openai/v1/embeddings", ApiHandler, {"face": faces.OPENAI_EMBEDDINGS}),
            (
                r"/openai/deployments/([^/]+)/embeddings",
                ApiHandler,
                {"face": faces.AZURE_EMBEDDINGS},
            ),
            (r"/v1/models", ModelsHandler),
            (r"/v1/models/([^/]+)", ModelsHandler),
            (r"/openai/v1/models", ModelsHandler),
            (r"/openai/v1/models/([^/]+)", ModelsHandler),
            (r"/v1/usage", UsageHandler),
            (r"/metrics", MetricsHandler),
            (r"/healthz", HealthHandler),
            (r"/readyz", ReadyHandler),
            (r"/v1/admin/deployments", AdminDeploymentsHandler),
            (r"/v1/admin/usage", AdminUsageHandler),
            (r"/v1/admin/requests", AdminRequestsHandler, {"recent": recent}),
            *console_routes(),
        ],
        default_handler_class=NotFoundHandler,
        transforms=[JsonOnlyGzip],
        pipeline=pipeline,
        log_function=log_request,
    )
