"""One access-log line per request: JSON for machines (PM2, log shippers), text for people.

Never a prompt, never a key: only the names and numbers listed in `FIELDS`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from gateway.encoding import compact_json_text

ACCESS_LOG = logging.getLogger("azure-gpt-api.access")

# In this order in both formats.
FIELDS = (
    "time",
    "request_id",
    "method",
    "route",
    "path",
    "status",
    "key",
    "deployment",
    "upstream_status",
    "attempts",
    "duration_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "apim_request_id",
)


def default_format(stream: Any = sys.stdout) -> str:
    """JSON when nobody is watching the terminal (PM2, systemd, docker), text when someone is."""
    return "text" if stream.isatty() else "json"


def format_line(record: Mapping[str, Any], style: str) -> str:
    fields = {name: value for name in FIELDS if (value := record.get(name)) is not None}
    if style == "json":
        return compact_json_text(fields)
    return " ".join(f"{name}={value}" for name, value in fields.items())


def timestamp(now: float | None = None) -> str:
    moment = time.time() if now is None else now
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"
    )


def write_access_log(record: Mapping[str, Any], style: str) -> None:
    status = record.get("status") or 0
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    ACCESS_LOG.log(level, format_line(record, style))
