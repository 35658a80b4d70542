"""Azure's remaining counts per deployment, read from the capacity board at each scrape.

The board (gateway/policy/capacity.py) keeps the last `x-ratelimit-remaining-tokens`
and `-requests` of each deployment with the time they came; a collector
turns them into gauges when Prometheus asks, so nothing is written per answer.
A count Azure gave as unknown (negative) has no sample. Each process shows
its own board: with several PM2 instances, a scrape sees the one it reached.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.policy.capacity import CapacityBoard


class DeploymentCapacityCollector(Collector):
    """`gateway_deployment_remaining_{tokens,requests}`, their age, and requests in flight."""

    def __init__(self, board: CapacityBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.board.snapshot()
        families = {
            kind: (
                GaugeMetricFamily(
                    f"gateway_deployment_remaining_{kind}",
                    f"The {kind} Azure last said the deployment has left "
                    f"(x-ratelimit-remaining-{kind}).",
                    labels=["deployment"],
                ),
                GaugeMetricFamily(
                    f"gateway_deployment_remaining_{kind}_age_seconds",
                    f"Seconds since Azure last reported the deployment's remaining {kind}.",
                    labels=["deployment"],
                ),
            )
            for kind in ("tokens", "requests")
        }
        in_flight = GaugeMetricFamily(
            "gateway_deployment_requests_in_flight",
            "Requests to the deployment being answered now (streams until they end).",
            labels=["deployment"],
        )
        for name, row in snapshot.items():
            for kind, reading in (
                ("tokens", row.remaining_tokens),
                ("requests", row.remaining_requests),
            ):
                if reading is None:
                    continue
                value_family, age_family = families[kind]
                if reading.value is not None:
                    value_family.add_metric([name], reading.value)
                age_family.add_metric([name], self.board.age(reading))
            in_flight.add_metric([name], row.in_flight)
        for value_family, age_family in families.values():
            yield value_family
            yield age_family
        yield in_flight
