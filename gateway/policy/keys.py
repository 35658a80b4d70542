"""Caller API keys: where they come from, and who is calling.

Keys come from `API_KEYS` (comma-separated, named key1, key2, ... in order)
or from the `keys:` section of a YAML file, whose entries may also carry
per-key limits (`rpm`, `tpm`), budgets (`tokens_per_day`, `tokens_per_month`,
`usd_per_month`: gateway/policy/budgets.py), the models a key may use and an `admin` flag.
An entry may also (or instead of a key) name the OIDC identity it stands for
(`oidc:`, gateway/policy/oidc.py), so a caller's bearer token gets its limits.
With no key configured the gateway stays open, as the original service was.

A key's value is a `Secret`: only its name and its `fingerprint` (a short
sha256 prefix) may appear in a log line, a metric or a stored record, and
no error message repeats a key a caller presented.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jsonschema.exceptions import ValidationError
from tornado.httputil import HTTPHeaders

from gateway.errors import ConfigError, GatewayError
from gateway.policy.budgets import Budget
from gateway.policy.deployments import entry_label, expand_variables
from gateway.policy.limits import KeyLimits
from gateway.policy.oidc import identities_from_keys
from gateway.secret import Secret
from gateway.validation import compile_validator, load_registry

KEYS_SCHEMA_ID = "keys.schema.json"
FINGERPRINT_LENGTH = 12
DEFAULT_KEYS_SOURCE = "DEPLOYMENTS_FILE"

# The rule each field of a `keys:` entry breaks, in the words of a config error.
_FIELD_RULES = {
    "name": "must be a non-empty string",
    "key": "must be a non-empty string (the key, or ${VAR})",
    "rpm": "must be an integer >= 1",
    "tpm": "must be an integer >= 1",
    "tokens_per_day": "must be an integer >= 1",
    "tokens_per_month": "must be an integer >= 1",
    "usd_per_month": "must be a number > 0",
    "models": "must be a non-empty list of model names",
    "admin": "must be true or false",
    "oidc": "must be a mapping of azp, appid, oid or sub to non-empty strings",
}


@dataclass(frozen=True)
class CallerKey:
    """One key callers may present, its name and what it may do."""

    name: str
    key: Secret | None  # None: an entry callers reach only with an OIDC token (`oidc`)
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    admin: bool = False
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_month: float | None = None
    oidc: tuple[tuple[str, str], ...] = ()  # the token claims this entry stands for

    @cached_property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.name, self.rpm, self.tpm)

    @cached_property
    def budget(self) -> Budget:
        return Budget(self.name, self.tokens_per_day, self.tokens_per_month, self.usd_per_month)

    @property
    def fingerprint(self) -> str:
        """The first 12 hex digits of the key's sha256: the only form of it that is logged."""
        if self.key is None:
            return ""
        return _digest(self.key.reveal()).hex()[:FINGERPRINT_LENGTH]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def keys_from_api_keys(raw: str) -> list[CallerKey]:
    """Parse `API_KEYS`: comma-separated keys named key1, key2, ...; blank items are skipped.

    A key given twice is a ConfigError naming both positions, never the key.
    """
    keys: list[CallerKey] = []
    first_named: dict[str, str] = {}
    problems: list[str] = []
    for value in (item.strip() for item in raw.split(",")):
        if not value:
            continue
        name = f"key{len(keys) + 1}"
        if value in first_named:
            problems.append(f"API_KEYS: {name} is the same key as {first_named[value]}")
        first_named.setdefault(value, name)
        keys.append(CallerKey(name=name, key=Secret(value)))
    if problems:
        raise ConfigError(problems)
    return keys


def keys_from_yaml(
    entries: list[dict[str, Any]],
    environ: Mapping[str, str],
    *,
    source: str = DEFAULT_KEYS_SOURCE,
) -> list[CallerKey]:
    """Build keys from a YAML `keys:` section, checked against `schema/keys.schema.json`.

    `source` (the variable naming the file) starts every problem line, e.g.
    `DEPLOYMENTS_FILE keys[1] (alice).rpm: must be an integer >= 1`; entries
    are counted from 0. A `${VAR}` in a key is replaced by VAR from
    `environ`, where an empty value counts as unset. Every problem is
    reported at once in one ConfigError; none of them contains a key.
    """
    validator = compile_validator(KEYS_SCHEMA_ID, load_registry())
    problems = [
        f"{source} {line}"
        for line in dict.fromkeys(
            _schema_problem(error, entries) for error in validator.iter_errors(entries)
        )
    ]
    if not isinstance(entries, list):
        raise ConfigError(problems)

    named_at: dict[str, str] = {}
    keyed_at: dict[str, str] = {}
    values: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            values.append("")
            continue
        where = entry_label("keys", index, entry)
        name = entry.get("name")
        if isinstance(name, str) and name:
            if name in named_at:
                problems.append(
                    f"{source} {where}.name: repeats {named_at[name]}; names must be unique"
                )
            named_at.setdefault(name, where)
        raw_key = entry.get("key")
        if not isinstance(raw_key, str) or not raw_key:
            values.append("")
            continue
        value, missing = expand_variables(raw_key, environ)
        for variable in missing:
            problems.append(f"{source} {where}.key: environment variable {variable} is not set")
        values.append(value)
        if missing:
            continue
        if value in keyed_at:
            problems.append(
                f"{source} {where}.key: is the same key as {keyed_at[value]}; "
                "every entry needs its own key"
            )
        keyed_at.setdefault(value, where)

    identities: dict[str, tuple[tuple[str, str], ...]] = {}
    if not problems:
        try:
            found = identities_from_keys(entries, source=source)
        except ConfigError as error:
            problems.extend(error.problems)
        else:
            identities = {identity.name: identity.claims for identity in found}
    if problems:
        raise ConfigError(problems)
    return [
        CallerKey(
            name=entry["name"],
            key=Secret(value) if value else None,
            rpm=int(entry["rpm"]) if "rpm" in entry else None,
            tpm=int(entry["tpm"]) if "tpm" in entry else None,
            models=tuple(entry["models"]) if "models" in entry else None,
            admin=bool(entry.get("admin", False)),
            tokens_per_day=entry.get("tokens_per_day"),
            tokens_per_month=entry.get("tokens_per_month"),
            usd_per_month=None if "usd_per_month" not in entry else float(entry["usd_per_month"]),
            oidc=identities.get(entry["name"], ()),
        )
        for entry, value in zip(entries, values, strict=True)
    ]


def _schema_problem(error: ValidationError, entries: Any) -> str:
    """One schema violation as `keys[i] (name).field: rule`, without the offending value."""
    path = list(error.absolute_path)
    if not path:
        return "keys: must be a list of key entries"
    where = entry_label("keys", path[0], entries[path[0]])
    if len(path) > 1:
        field = str(path[1])
        return f"{where}.{field}: {_FIELD_RULES.get(field, 'is not valid')}"
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        return f"{where}.{missing[0]}: is required"
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(str(name) for name in error.instance if name not in allowed)
        return (
            f"{where}.{unknown[0]}: is not a known field (allowed: {', '.join(allowed)})"
            if len(unknown) == 1
            else f"{where}: {', '.join(unknown)} are not known fields "
            f"(allowed: {', '.join(allowed)})"
        )
    if error.validator == "anyOf":
        return f"{where}: needs a key, or an oidc: identity, or both"
    return f"{where}: must be a mapping with at least name and key"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `api-key: K` or else `Authorization: Bearer K` (any header-name case)."""
    if not isinstance(headers, HTTPHeaders):
        headers = HTTPHeaders(headers)
    api_key = headers.get("api-key", "").strip()
    authorization = headers.get("Authorization", "").strip()
    if api_key:
        return api_key
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class KeyRing:
    """The configured keys, and the checks a request passes before it reaches Azure."""

    def __init__(self, keys: Iterable[CallerKey]) -> None:
        self.keys = tuple(keys)
        # Digests, not keys: every comparison is between two 32-byte values,
        # so its time does not depend on the presented key's length.
        self._digests = tuple(
            (_digest(key.key.reveal()), key) for key in self.keys if key.key is not None
        )
        if len({digest for digest, _ in self._digests}) != len(self._digests):
            raise ValueError("two caller keys have the same value")
        if len({key.name for key in self.keys}) != len(self.keys):
            raise ValueError("two caller keys have the same name")

    @property
    def is_open(self) -> bool:
        """No key configured: every caller is let in, as the original service did."""
        return not self.keys

    def authenticate(self, headers: Mapping[str, str]) -> CallerKey | None:
        """The caller's key, None when the ring is open; a 401 GatewayError otherwise.

        The presented key is compared with every configured one, without
        stopping at a match, so the time taken does not tell which key (or
        how much of one) matched.
        """
        if self.is_open:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise GatewayError(
                401,
                "missing_api_key",
                "No API key: send it in the api-key header or as Authorization: Bearer <key>.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(presented)
        found = None
        for candidate, key in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = key
        if found is None:
            raise GatewayError(
                401,
                "invalid_api_key",
                "The API key is not valid.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return found

    def named(self, name: str) -> CallerKey:
        """The entry called `name` (an OIDC token resolved to it)."""
        return next(key for key in self.keys if key.name == name)

    def check_model(self, key: CallerKey | None, model_names: Iterable[str]) -> None:
        """Raise a 403 when `key` is limited to some models and none of `model_names` is one."""
        if key is None or key.models is None:
            return
        names = list(model_names)
        if any(name in key.models for name in names):
            return
        asked = ", ".join(names) or "(none)"
        raise GatewayError(
            403,
            "model_not_allowed",
            f"The API key {key.name!r} may not use the model {asked}; "
            f"it may use: {', '.join(key.models)}.",
        )
