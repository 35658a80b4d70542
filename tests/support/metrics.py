"""Reading a Prometheus exposition: every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, tuple[tuple[str, str], ...]]


def series(name: str, **labels: str) -> Series:
    return name, tuple(sorted(labels.items()))


def samples(exposition: bytes | str) -> dict[Series, float]:
    """Every sample of an exposition, keyed by `series(name, **labels)`."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(found: dict[Series, float], name: str, **labels: str) -> float:
    return found[series(name, **labels)]
