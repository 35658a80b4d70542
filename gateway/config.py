"""Settings: read once at start-up from the environment and a `.env` file.

The variable names are the original Node service's, so an existing `.env`
keeps working. The process environment wins over the file; an empty value
means "unset" wherever it stands, so an empty exported variable does not hide
a value from the file. Every problem is collected and reported at once, one
line each, naming the variable and the rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from dotenv import dotenv_values

from .deployments import Deployment, load_deployments, read_yaml
from .errors import ConfigError
from .httpclient import parse_proxy_url
from .keys import CallerKey, keys_from_api_keys, keys_from_yaml
from .secret import Secret

DEFAULT_ENV_FILE = ".env"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_HTTP_PORT = 80
DEFAULT_HTTPS_PORT = 443
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
DEFAULT_MAX_CLIENTS = 1000
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_FIRST_BYTE_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_STREAM_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_RETRY_WAIT = 10.0
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_MAX_COOLDOWN = 60.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 65.0
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
DEFAULT_MAX_OTHER_BODY_SIZE = 4 * 1024
# Real chat bodies stay far below: the deepest request examples in Azure's
# 2024-10-21 spec nest 6 levels, the deepest in OpenAI's (a tool's parameter
# schema) 8. The limit on the limit is orjson's encoder's (gateway/jsonbody.py).
DEFAULT_MAX_JSON_DEPTH = 64
MAX_JSON_DEPTH_LIMIT = 254
DEFAULT_CORS_ORIGINS = ("*",)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs, cast and checked."""

    deployments: tuple[Deployment, ...]
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    https_port: int = DEFAULT_HTTPS_PORT
    enable_ssl: bool = False
    ssl_cert: str | None = None
    ssl_key: str | None = None
    parameter_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    max_other_body_size: int = DEFAULT_MAX_OTHER_BODY_SIZE
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_clients: int = DEFAULT_MAX_CLIENTS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT
    max_cooldown: float = DEFAULT_MAX_COOLDOWN
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    log_format: str = "json"
    caller_keys: tuple[CallerKey, ...] = ()
    redis_url: Secret | None = None
    quota_on_redis_error: str = "open"
    metrics_key: Secret | None = None
    drain_grace: float = 0.0
    # "http"/"https" -> proxy URL (it may hold a password), "no" -> NO_PROXY's list.
    proxies: Mapping[str, Secret] = field(default_factory=lambda: MappingProxyType({}))


def _number(low: float, high: float) -> Callable[[str], float]:
    def cast(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number from {low:g} to {high:g}") from None
        if not low <= value <= high:
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return value

    return cast


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    rule = f"must be an integer from {low} to {high}" if high else f"must be an integer >= {low}"

    def cast(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(rule) from None
        if value < low or (high is not None and value > high):
            raise ValueError(rule)
        return value

    return cast


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds > 0") from None
    if value <= 0:
        raise ValueError("must be a number of seconds > 0")
    return value


def _non_negative_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds >= 0") from None
    if value < 0:
        raise ValueError("must be a number of seconds >= 0")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be true or false")


def _stop(raw: str) -> str | list[str]:
    """Accept a plain string, or a JSON array of 1-4 strings (`["\\n","END"]`)."""
    if not raw.lstrip().startswith("["):
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("must be a string or a JSON array of 1 to 4 strings") from None
    if not (1 <= len(value) <= 4 and all(isinstance(item, str) for item in value)):
        raise ValueError("must be a string or a JSON array of 1 to 4 strings")
    return value


def _endpoint(raw: str) -> str:
    if not raw.startswith(("https://", "http://")):
        raise ValueError("must be a URL starting with https:// (or http://)")
    return raw.rstrip("/")


def _existing_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError(f"must name an existing file ({raw} not found)")
    return raw


def _log_format(raw: str) -> str:
    if raw not in ("json", "text"):
        raise ValueError("must be json or text")
    return raw


def _redis_error_mode(raw: str) -> str:
    if raw not in ("open", "closed"):
        raise ValueError("must be open or closed")
    return raw


def _redis_url(raw: str) -> Secret:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return Secret(raw)


def _origins(raw: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in raw.split(",") if origin.strip())


# The chat parameters a `.env` may give defaults for, with the same ranges
# the request schema enforces.
PARAMETER_CASTS: Mapping[str, Callable[[str], Any]] = MappingProxyType(
    {
        "temperature": _number(0, 2),
        "top_p": _number(0, 1),
        "n": _integer(1, 128),
        "stream": _boolean,
        "stop": _stop,
        "max_tokens": _integer(1),
        "presence_penalty": _number(-2, 2),
        "frequency_penalty": _number(-2, 2),
        "user": str,
    }
)

_SERVER_CASTS: Mapping[str, tuple[str, Callable[[str], Any]]] = MappingProxyType(
    {
        "HOST": ("host", str),
        "HTTP_PORT": ("http_port", _integer(0, 65535)),
        "HTTPS_PORT": ("https_port", _integer(0, 65535)),
        "ENABLE_SSL": ("enable_ssl", _boolean),
        "SSL_CERT": ("ssl_cert", _existing_file),
        "SSL_KEY": ("ssl_key", _existing_file),
        "MAX_BODY_SIZE": ("max_body_size", _integer(1)),
        "MAX_OTHER_BODY_SIZE": ("max_other_body_size", _integer(0)),
        "MAX_JSON_DEPTH": ("max_json_depth", _integer(1, MAX_JSON_DEPTH_LIMIT)),
        "MAX_HEADER_SIZE": ("max_header_size", _integer(1024)),
        "BODY_TIMEOUT": ("body_timeout", _seconds),
        "KEEP_ALIVE_TIMEOUT": ("keep_alive_timeout", _seconds),
        "MAX_CLIENTS": ("max_clients", _integer(1)),
        "CONNECT_TIMEOUT": ("connect_timeout", _seconds),
        "FIRST_BYTE_TIMEOUT": ("first_byte_timeout", _seconds),
        "REQUEST_TIMEOUT": ("request_timeout", _seconds),
        "STREAM_IDLE_TIMEOUT": ("stream_idle_timeout", _seconds),
        "MAX_ATTEMPTS": ("max_attempts", _integer(1, 10)),
        "MAX_RETRY_WAIT": ("max_retry_wait", _non_negative_seconds),
        "MAX_COOLDOWN": ("max_cooldown", _seconds),
        "DRAIN_TIMEOUT": ("drain_timeout", _seconds),
        "CORS_ORIGINS": ("cors_origins", _origins),
        "LOG_FORMAT": ("log_format", _log_format),
        "REDIS_URL": ("redis_url", _redis_url),
        "QUOTA_ON_REDIS_ERROR": ("quota_on_redis_error", _redis_error_mode),
        "METRICS_KEY": ("metrics_key", Secret),
        "DRAIN_GRACE": ("drain_grace", _non_negative_seconds),
    }
)

_DEPLOYMENT_CASTS: Mapping[str, tuple[str, Callable[[str], Any]]] = MappingProxyType(
    {
        "ENDPOINT": ("endpoint", _endpoint),
        "DEPLOYMENT_NAME": ("deployment", str),
        "API_VERSION": ("api_version", str),
        "KEY": ("key", Secret),
    }
)


def read_sources(environ: Mapping[str, str]) -> dict[str, str]:
    """Merge the `.env` file (or `ENV_FILE`) under the environment, dropping empty values."""
    env_file = environ.get("ENV_FILE") or DEFAULT_ENV_FILE
    if environ.get("ENV_FILE") and not os.path.isfile(env_file):
        raise ConfigError([f"ENV_FILE: must name an existing file ({env_file} not found)"])
    from_file = dotenv_values(env_file) if os.path.isfile(env_file) else {}
    merged = {name: value for name, value in from_file.items() if value}
    merged.update({name: value for name, value in environ.items() if value})
    return merged


def load_settings(
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> Settings:
    """Build `Settings` from the environment, the env file, `defaults` (which lose to
    both) and `overrides` (which win over everything).

    Raises ConfigError listing every problem; the key's value is never part
    of a message.
    """
    values = {**(defaults or {}), **read_sources(environ), **(overrides or {})}
    problems: list[str] = []

    def cast_all(table: Mapping[str, tuple[str, Callable[[str], Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for variable, (attribute, cast) in table.items():
            if variable in values:
                try:
                    out[attribute] = cast(values[variable])
                except ValueError as error:
                    problems.append(f"{variable}: {error}")
        return out

    server = cast_all(_SERVER_CASTS)
    deployments: tuple[Deployment, ...] = ()
    caller_keys: list[CallerKey] = []
    if "API_KEYS" in values:
        caller_keys += keys_from_api_keys(values["API_KEYS"])
    if "DEPLOYMENTS_FILE" in values:
        try:
            document = read_yaml(values["DEPLOYMENTS_FILE"])
            deployments = load_deployments(document, values)
            if isinstance(document, dict) and document.get("keys"):
                caller_keys += keys_from_yaml(document["keys"], values)
        except ConfigError as error:
            problems.extend(error.problems)
    else:
        single = cast_all(_DEPLOYMENT_CASTS)
        missing = [variable for variable in _DEPLOYMENT_CASTS if variable not in values]
        problems.extend(
            f"{variable}: is required (or set DEPLOYMENTS_FILE)" for variable in missing
        )
        if not missing and len(single) == len(_DEPLOYMENT_CASTS):
            deployments = (
                Deployment(name=single["deployment"], models=(single["deployment"],), **single),
            )

    defaults: dict[str, Any] = {}
    for name, cast in PARAMETER_CASTS.items():
        if name in values:
            try:
                defaults[name] = cast(values[name])
            except ValueError as error:
                problems.append(f"{name}: {error}")

    if server.get("enable_ssl"):
        for variable in ("SSL_CERT", "SSL_KEY"):
            if variable not in values:
                problems.append(f"{variable}: is required when ENABLE_SSL is true")

    proxies = read_proxies(values, problems)

    names = [key.name for key in caller_keys]
    problems.extend(
        f"API_KEYS/DEPLOYMENTS_FILE keys: the name {name!r} is used twice"
        for name in sorted({n for n in names if names.count(n) > 1})
    )
    if len({key.key for key in caller_keys}) < len(caller_keys):
        problems.append("API_KEYS/DEPLOYMENTS_FILE keys: the same key is given twice")
    if problems:
        raise ConfigError(problems)
    return Settings(
        deployments=deployments,
        caller_keys=tuple(caller_keys),
        parameter_defaults=MappingProxyType(defaults),
        proxies=MappingProxyType(proxies),
        **server,
    )


def read_proxies(values: Mapping[str, str], problems: list[str]) -> dict[str, Secret]:
    """HTTP_PROXY, HTTPS_PROXY and NO_PROXY as curl reads them (the lower-case name wins)."""
    proxies: dict[str, Secret] = {}
    for scheme in ("http", "https", "no"):
        for variable in (f"{scheme.upper()}_PROXY", f"{scheme}_proxy"):
            if values.get(variable):
                proxies[scheme] = Secret(values[variable])
                if scheme != "no":
                    try:
                        parse_proxy_url(values[variable], variable)
                    except ValueError as error:
                        problems.append(str(error))
    return proxies
