"""Which deployment a request about a stored response must go to.

A stored response can only be continued, read, deleted or cancelled on the
deployment that made it (gateway/policy/affinity.py says why and how that is
remembered). `Holders` answers "which one holds `resp_...`?": the recorded
deployment; for an id never recorded, the pipeline asks the candidates in
turn until one answers other than 404 — the request itself when it has no
body (retrieve, delete, cancel, input_items: only the holder can answer it),
a retrieve before a create with `previous_response_id` (`look_up`) — and the
one that answers is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.faces import Face
from gateway.ops.metrics import Metrics
from gateway.policy.affinity import AffinityStore
from gateway.policy.deployments import Deployment
from gateway.policy.failover import DeploymentPool
from gateway.upstream.client import UpstreamCall, UpstreamResponse, UpstreamTarget

# The attempts metric's outcome for a deployment asked for an id it does not hold.
NOT_HELD = "not_held"


def response_not_found(
    response_id: str, holder: Deployment | None = None, error: GatewayError | None = None
) -> GatewayError:
    """404 for an id no deployment (or no longer its holder) knows."""
    where = (
        "on any deployment"
        if holder is None
        else f"on the deployment {holder.name!r} that held it (deleted or expired)"
    )
    return GatewayError(
        404,
        "not_found",
        f"Response with id {response_id!r} not found {where}.",
        upstream_status=error.upstream_status if error else None,
        upstream_headers=error.upstream_headers if error else None,
    )


class ReadsResponses(Protocol):
    """The part of the upstream client a look-up uses (gateway.upstream.client)."""

    async def complete(
        self, deployment: Deployment, target: UpstreamTarget, body: None, call: UpstreamCall
    ) -> UpstreamResponse | None: ...


class Holders:
    """The deployments holding stored responses, over one pool and one affinity store."""

    def __init__(
        self,
        pool: DeploymentPool,
        affinity: AffinityStore,
        upstream: ReadsResponses,
        metrics: Metrics,
    ) -> None:
        self.pool = pool
        self.affinity = affinity
        self.upstream = upstream
        self.metrics = metrics

    async def holder(
        self, face: Face, response_id: str, candidates: tuple[Deployment, ...]
    ) -> Deployment | None:
        """The recorded holder of `response_id` among `candidates`; None if none is recorded.

        A holder that is not among them (it does not serve the model asked
        for, or the caller's key may not use it) is a 400: no other can help.
        """
        name = await self.affinity.owner(response_id)
        holder = next((d for d in candidates if d.name == name), None)
        if holder is None and name is not None and self.pool.by_name(name) is not None:
            raise GatewayError(
                400,
                "deployment_mismatch",
                f"The response {response_id!r} is held by the deployment {name!r}, which does "
                "not serve the model asked for (or which your key may not use).",
                param="model" if face.reads_body else None,
            )
        return holder

    async def look_up(
        self, face: Face, response_id: str, candidates: tuple[Deployment, ...], request_id: str
    ) -> Deployment:
        """The first candidate whose `GET /responses/{id}` succeeds, recorded as its holder
        (for a create's `previous_response_id`, and before a stream is resumed)."""
        failure: GatewayError | None = None
        for deployment in candidates:
            call = UpstreamCall(request_id)
            target = UpstreamTarget(face.operation, "GET", response_id)
            try:
                await self.upstream.complete(deployment, target, None, call)
            except GatewayError as error:
                if error.upstream_status == 404:
                    self.metrics.count_attempt(deployment.name, NOT_HELD)
                    continue
                self.metrics.count_attempt(deployment.name, error.code)
                failure = error
                continue
            self.metrics.count_attempt(deployment.name, "ok")
            await self.affinity.record(response_id, deployment.name)
            return deployment
        if failure is not None:
            raise failure
        if not face.reads_body:
            raise response_not_found(response_id)
        raise GatewayError(
            400,
            "previous_response_not_found",
            f"Previous response with id {response_id!r} not found on any deployment.",
            param="previous_response_id",
        )

    async def remember(
        self,
        face: Face,
        response: Mapping[str, Any] | None,
        request: Mapping[str, Any] | None,
        deployment: Deployment,
    ) -> None:
        """Record a created response's deployment (not one made with `store: false`)."""
        if not face.records_response or not isinstance(response, Mapping):
            return
        if (request or {}).get("store") is False or response.get("store") is False:
            return
        response_id = response.get("id")
        if isinstance(response_id, str) and response_id:
            await self.affinity.record(response_id, deployment.name)
