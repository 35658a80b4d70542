"""The deployments file (`DEPLOYMENTS_FILE`): several Azure deployments in YAML.

Read once at start-up with `yaml.safe_load` (dates kept as text), checked against
`schema/deployments.schema.json`, `${VAR}` references expanded from the
environment. Every problem becomes one line naming the entry and the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import yaml

from gateway.errors import ConfigError
from gateway.policy.budgets import Price
from gateway.policy.capacity import DEFAULT_PRIORITY
from gateway.secret import Secret
from gateway.upstream.auth import EntraOptions, parse_auth_entry
from gateway.validation import compile_validator, describe, field_path, load_registry

SOURCE = "DEPLOYMENTS_FILE"


@dataclass(frozen=True)
class Deployment:
    """One Azure OpenAI deployment the gateway sends requests to.

    It authenticates with its `key` (the `api-key` header) or, when `entra`
    names an identity, with that identity's Entra ID token; never both.
    """

    name: str
    endpoint: str
    deployment: str
    api_version: str
    key: Secret | None
    weight: float = 1.0
    models: tuple[str, ...] = ()
    # Requests go to the lowest priority with capacity (gateway/policy/capacity.py).
    priority: int = DEFAULT_PRIORITY
    price: Price | None = None  # US dollars per million tokens; None costs nothing
    entra: EntraOptions | None = None

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every name a caller may ask for this deployment by: ours, Azure's, its models."""
        return tuple(dict.fromkeys((self.name, self.deployment, *self.models)))

    def serves(self, model: str) -> bool:
        """True if a caller asking for `model` may be sent here."""
        return model in self.names


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _DatesAsTextLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a date stays the text it was written as.

    `api_version: 2024-10-21` without quotes is a date to YAML; the gateway
    wants the version's text, and a message saying the string "2024-10-21"
    is not a string would only puzzle its reader.
    """


_DatesAsTextLoader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    yaml.SafeLoader.construct_yaml_str,  # type: ignore[type-var]
)


def read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_DatesAsTextLoader)
    except OSError as error:
        raise ConfigError([f"{SOURCE}: cannot read {path} ({error.strerror})"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{SOURCE}: {path} is not valid YAML ({error})"]) from None


def entry_label(section: str, index: int, entry: Any) -> str:
    """`deployments[1] (westeurope)`: how a problem names the entry it is in."""
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{section}[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def expand_variables(raw: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """`raw` with every `${VAR}` replaced from `environ`, and the variables unset or empty there."""
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        variable = match.group(1)
        if not environ.get(variable):
            missing.append(variable)
            return ""
        return environ[variable]

    return _VARIABLE.sub(substitute, raw), list(dict.fromkeys(missing))


def schema_problems(document: Any, schema_id: str, prefix: str) -> list[str]:
    """One line per schema violation: `PREFIX deployments[0] (name).field: predicate`."""
    validator = compile_validator(schema_id, load_registry())
    problems = []
    for error in validator.iter_errors(document):
        path = list(error.absolute_path)
        where = prefix
        if len(path) >= 2 and isinstance(path[1], int):
            where += " " + entry_label(str(path[0]), path[1], document[path[0]][path[1]])
            path = path[2:]
        elif path:
            where += " " + field_path(path[:1])
            path = path[1:]
        _param, _rule, predicate = describe(error)
        problems.append(f"{where}{''.join(f'.{part}' for part in path)}: {predicate}")
    return sorted(problems)


def load_deployments(document: Any, environ: Mapping[str, str]) -> tuple[Deployment, ...]:
    """The `deployments:` section as Deployment objects, or ConfigError listing every problem."""
    problems = schema_problems(document, "deployments.schema.json", SOURCE)
    if problems:
        raise ConfigError(problems)
    deployments = []
    seen: set[str] = set()
    for index, entry in enumerate(document["deployments"]):
        label = f"{SOURCE} {entry_label('deployments', index, entry)}"
        if entry["name"] in seen:
            problems.append(f"{label}.name: duplicate name {entry['name']!r}")
        seen.add(entry["name"])
        fields = {}
        for field in ("key", "endpoint"):
            if field not in entry:
                continue
            fields[field], missing = expand_variables(entry[field], environ)
            problems.extend(
                f"{label}.{field}: ${{{variable}}} is not set in the environment"
                for variable in missing
            )
        endpoint = fields["endpoint"]
        entra = None
        if "auth" in entry:
            try:
                entra = parse_auth_entry(
                    entry["auth"], lambda raw: expand_variables(raw, environ), label
                )
            except ConfigError as error:
                problems.extend(error.problems)
        if endpoint and not endpoint.startswith(("https://", "http://")):
            problems.append(f"{label}.endpoint: must be a URL starting with https:// (or http://)")
        deployments.append(
            Deployment(
                name=entry["name"],
                endpoint=endpoint.rstrip("/"),
                deployment=entry["deployment"],
                api_version=str(entry["api_version"]),
                key=Secret(fields["key"]) if "key" in fields else None,
                weight=float(entry.get("weight", 1)),
                models=tuple(entry.get("models") or (entry["deployment"],)),
                priority=int(entry.get("priority", DEFAULT_PRIORITY)),
                price=Price.from_config(entry["price"]) if "price" in entry else None,
                entra=entra,
            )
        )
    if problems:
        raise ConfigError(problems)
    return tuple(deployments)
