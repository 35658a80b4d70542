"""DEPLOYMENTS_FILE documents written for a test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_deployments_file(
    tmp_path: Path, deployments: list[dict[str, Any]], keys: list[dict[str, Any]] | None = None
) -> str:
    """A new DEPLOYMENTS_FILE in `tmp_path` (JSON, which is YAML); its path."""
    path = tmp_path / f"deployments-{len(list(tmp_path.glob('deployments-*')))}.yaml"
    document: dict[str, Any] = {"deployments": deployments}
    if keys is not None:
        document["keys"] = keys
    path.write_text(json.dumps(document))
    return str(path)
