"""The admin documents the console reads: deployments, usage, recent requests."""

from __future__ import annotations

import pytest

from gateway.ops.accesslog import FIELDS
from gateway.ops.admin import (
    DeploymentState,
    KeyQuota,
    RecentRequests,
    deployments_document,
    requests_document,
    requests_limit,
    usage_document,
)

NOW = 1_767_268_800.0  # 2026-01-01T12:00:00Z


def test_deployments_show_state_cool_down_and_recent_error_rate():
    document = deployments_document(
        [
            DeploymentState(
                name="westeurope",
                deployment="gpt-4o",
                endpoint="https://we.openai.azure.com",
                models=("gpt-4o",),
                in_flight=2,
                azure_remaining_requests=99,
                azure_remaining_tokens=-1,
                recent_requests=20,
                recent_errors=2,
            ),
            DeploymentState(
                name="eastus",
                deployment="gpt-4o-east",
                endpoint="https://east.openai.azure.com/",
                weight=2.0,
                priority=1,
                cooling_for=12.5,
            ),
        ],
        now=NOW,
    )
    ready, cooling = document["deployments"]
    assert document["time"] == "2026-01-01T12:00:00.000Z"
    assert ready == {
        "name": "westeurope",
        "deployment": "gpt-4o",
        "host": "we.openai.azure.com",
        "models": ["gpt-4o"],
        "weight": 1.0,
        "priority": None,
        "state": "ready",
        "cooling_down_until": None,
        "cooling_down_seconds": 0,
        "in_flight": 2,
        "azure_remaining_requests": 99,
        "azure_remaining_tokens": None,
        "recent": {"requests": 20, "errors": 2, "error_rate": 0.1, "window_seconds": 300},
    }
    assert cooling["state"] == "cooling_down"
    assert cooling["cooling_down_until"] == "2026-01-01T12:00:12.500Z"
    assert cooling["cooling_down_seconds"] == 12.5
    assert cooling["recent"]["error_rate"] is None
    assert (cooling["weight"], cooling["priority"]) == (2.0, 1)


def test_usage_rows_totals_and_quota_remaining_from_the_usage_report():
    report = {
        "keys": {
            "alice": {"westeurope": {"requests": 3, "prompt_tokens": 30, "completion_tokens": 12}},
            "bob": {
                "eastus": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5},
                "westeurope": {"requests": 2, "prompt_tokens": 8, "completion_tokens": 0},
            },
        }
    }
    document = usage_document(
        report,
        scope="process",
        quotas=[
            KeyQuota("alice", rpm=60, tpm=40, requests_used=3, tokens_used=42, resets_in_seconds=9),
            KeyQuota("bob", rpm=None, tpm=None),
        ],
        now=NOW,
    )
    assert document["scope"] == "process"
    assert [(row["key"], row["deployment"], row["total_tokens"]) for row in document["rows"]] == [
        ("alice", "westeurope", 42),
        ("bob", "eastus", 10),
        ("bob", "westeurope", 8),
    ]
    assert all(row["cost"] is None for row in document["rows"])
    assert document["totals"] == {
        "requests": 6,
        "prompt_tokens": 43,
        "completion_tokens": 17,
        "total_tokens": 60,
        "cost": None,
    }
    alice, bob = document["quotas"]
    assert alice == {
        "key": "alice",
        "rpm": 60,
        "tpm": 40,
        "remaining_requests": 57,
        "remaining_tokens": 0,
        "resets_in_seconds": 9,
    }
    assert (bob["remaining_requests"], bob["remaining_tokens"]) == (None, None)


def test_usage_costs_fill_in_once_given():
    report = {
        "keys": {"alice": {"we": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1}}}
    }
    report["keys"]["alice"]["we"]["cost_usd"] = 0.25
    document = usage_document(report, scope="shared")
    assert document["rows"][0]["cost"] == 0.25
    assert document["totals"]["cost"] == 0.25


def test_recent_requests_keep_the_newest_and_only_access_log_fields():
    recent = RecentRequests(capacity=3)
    for number in range(5):
        recent.add(
            {
                "request_id": f"req-{number}",
                "status": 200,
                "key": "alice",
                "prompt": "secret prompt text",
                "authorization": "Bearer sk-secret",
                "ttft_ms": None,
            }
        )
    assert len(recent) == 3
    newest = recent.newest()
    assert [record["request_id"] for record in newest] == ["req-4", "req-3", "req-2"]
    assert all(set(record) <= set(FIELDS) for record in newest)
    assert "ttft_ms" not in newest[0]
    document = requests_document(recent, limit=2, now=NOW)
    assert document["capacity"] == 3
    assert [record["request_id"] for record in document["requests"]] == ["req-4", "req-3"]
    assert "secret" not in repr(document)


def test_requests_limit_defaults_and_names_its_rule():
    assert requests_limit(None, 200) == 50
    assert requests_limit("", 10) == 10
    assert requests_limit("7", 200) == 7
    for wrong in ("0", "201", "-1", "many"):
        with pytest.raises(ValueError, match="limit must be a whole number from 1 to 200"):
            requests_limit(wrong, 200)
    with pytest.raises(ValueError):
        RecentRequests(capacity=0)
