"""Settings: declared once, read once at start-up from the environment and a `.env` file.

Each setting is declared once, as a field of `Settings` made by `setting()`:
the variable's name, how its text is cast and checked, its default and what
it means. The loader, its error messages (`NAME: rule`, the rule from the
cast) and the README's configuration table (`readme_table()`, checked by a
test) all come from that declaration. The few settings assembled from
several variables (the deployments, the caller keys, the parameter
defaults, the proxies) declare those variables the same way, next to the field.

The variable names are the original Node service's, so an existing `.env`
keeps working. The process environment wins over the file; an empty value
means "unset" wherever it stands, so an empty exported variable does not hide
a value from the file. Every problem is collected and reported at once, one
line each, naming the variable and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dotenv import dotenv_values

from gateway.errors import ConfigError
from gateway.ops.tracing import TracingSettings, load_tracing_settings
from gateway.policy.deployments import Deployment, load_deployments, read_yaml
from gateway.policy.keys import CallerKey, keys_from_api_keys, keys_from_yaml
from gateway.secret import Secret
from gateway.upstream.auth import auth_from_settings
from gateway.upstream.httpclient import parse_proxy_url

DEFAULT_ENV_FILE = ".env"
# MAX_JSON_DEPTH's own bound: orjson's encoder stops at 254 levels (gateway/jsonbody.py).
# Real chat bodies stay far below: the deepest request examples in Azure's
# 2024-10-21 spec nest 6 levels, the deepest in OpenAI's (a tool's parameter schema) 8.
MAX_JSON_DEPTH_LIMIT = 254

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


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


def _routing(raw: str) -> str:
    if raw not in ("weighted", "least-busy"):
        raise ValueError("must be weighted or least-busy")
    return raw


def _existing_dir(raw: str) -> str:
    if not os.path.isdir(raw):
        raise ValueError(f"must name an existing directory ({raw} not found)")
    return raw


def _issuer(raw: str) -> str:
    if not raw.startswith(("https://", "http://")):
        raise ValueError("must be the issuer's URL (https://...), as its tokens' iss says")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in raw.split(",") if origin.strip())


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, how its text is read, its default, its meaning."""

    name: str
    cast: Callable[[str], Any]
    doc: str
    default: Any = None  # the value when unset; None: no value
    shown_default: str | None = None  # the README's words for a default that is not a literal

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "—"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, float) and self.default.is_integer():
            return f"`{int(self.default)}`"
        if isinstance(self.default, tuple):
            return f"`{','.join(self.default)}`"
        return f"`{self.default}`"


_VARIABLES = "variables"
_ASSEMBLED = "assembled"


def setting(
    name: str, cast: Callable[[str], Any], doc: str, default: Any = None, shown: str | None = None
) -> Any:
    """A `Settings` field read from the variable `name` (None when unset and no default)."""
    variable = Variable(name, cast, doc, default, shown)
    return field(default=default, metadata={_VARIABLES: (variable,)})


def assembled(*variables: Variable, default: Any) -> Any:
    """A `Settings` field the loader builds from several `variables` (see `load_settings`)."""
    metadata = {_VARIABLES: variables, _ASSEMBLED: True}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


_PARAMETERS_DOC = (
    "defaults for requests that leave them out. `stop` is a string or a JSON array "
    '(`stop=["\\n","END"]`); `top_p` is a float (the original parsed it as an integer)'
)
# The chat parameters a `.env` may give defaults for, with the ranges the request schema enforces.
PARAMETER_VARIABLES = (
    Variable("temperature", _number(0, 2), _PARAMETERS_DOC),
    Variable("top_p", _number(0, 1), _PARAMETERS_DOC),
    Variable("n", _integer(1, 128), _PARAMETERS_DOC),
    Variable("stream", _boolean, _PARAMETERS_DOC),
    Variable("stop", _stop, _PARAMETERS_DOC),
    Variable("max_tokens", _integer(1), _PARAMETERS_DOC),
    Variable("presence_penalty", _number(-2, 2), _PARAMETERS_DOC),
    Variable("frequency_penalty", _number(-2, 2), _PARAMETERS_DOC),
    Variable("user", str, _PARAMETERS_DOC),
)
PARAMETER_CASTS: Mapping[str, Callable[[str], Any]] = MappingProxyType(
    {variable.name: variable.cast for variable in PARAMETER_VARIABLES}
)
# One deployment without a DEPLOYMENTS_FILE: (variable, Deployment field).
SINGLE_DEPLOYMENT = (
    (
        Variable(
            "ENDPOINT",
            _endpoint,
            "`https://<resource>.openai.azure.com/` (trailing slash optional; `http://` allowed)",
        ),
        "endpoint",
    ),
    (Variable("DEPLOYMENT_NAME", str, "Azure deployment"), "deployment"),
    (
        Variable(
            "API_VERSION",
            str,
            "`v1` (Azure's v1 API: `/openai/v1/...`, the model named in the body), `preview`, "
            "or a dated version such as `2024-10-21`",
        ),
        "api_version",
    ),
    (Variable("KEY", Secret, "Azure key, sent as `api-key`"), "key"),
)
AZURE_AUTH = Variable(
    "AZURE_AUTH",
    str,
    "`key` sends `KEY`; `entra` (the default chain), `managed_identity`, `workload_identity` "
    "or `azure_cli` sends an Entra ID token instead, and `KEY` stays empty (see Keyless with "
    "Entra ID)",
    shown_default="`key`",
)
DEPLOYMENTS_FILE = Variable(
    "DEPLOYMENTS_FILE",
    str,
    "YAML file of several deployments (and caller keys); replaces the five above",
)
# Read by azure-identity itself; the single-deployment rule reads it too (a user-assigned identity).
AZURE_CLIENT_ID = "AZURE_CLIENT_ID"
API_KEYS = Variable(
    "API_KEYS", str, "comma-separated caller keys (named `key1`, `key2`, ...); none = open server"
)
_PROXY_DOC = (
    "reach Azure through an `http://[user:pass@]host:port` proxy (a `CONNECT` tunnel for "
    "`https://` endpoints), as curl reads them (the lower-case name wins); `NO_PROXY` lists "
    "hosts to reach directly"
)
PROXY_VARIABLES = tuple(
    Variable(f"{scheme}_PROXY", str, _PROXY_DOC) for scheme in ("HTTPS", "HTTP", "NO")
)
# The standard OpenTelemetry variables most set; gateway/ops/tracing.py reads
# these and the rest of them (README "Tracing").
TRACING_VARIABLES = (
    Variable(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        str,
        "OTLP/HTTP collector for traces (`http://localhost:4318`); unset: tracing is off",
    ),
    Variable("OTEL_SERVICE_NAME", str, "the traces' `service.name`", "azure-gpt-api"),
    Variable(
        "OTEL_TRACES_SAMPLER",
        str,
        "which requests are traced (`OTEL_TRACES_SAMPLER_ARG` for the ratio ones)",
        "parentbased_always_on",
    ),
    Variable(
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        str,
        "SENSITIVE: record prompts and answers in the traces",
        False,
    ),
)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs, cast and checked. Field order is the README table's."""

    host: str = setting("HOST", str, "bind address", "0.0.0.0")
    http_port: int = setting(
        "HTTP_PORT",
        _integer(0, 65535),
        "HTTP port (several processes may share it: `SO_REUSEPORT`)",
        80,
    )
    enable_ssl: bool = setting("ENABLE_SSL", _boolean, "also serve HTTPS on `HTTPS_PORT`", False)
    https_port: int = setting("HTTPS_PORT", _integer(0, 65535), "HTTPS port", 443)
    ssl_cert: str | None = setting(
        "SSL_CERT", _existing_file, "PEM files, required with `ENABLE_SSL=true`"
    )
    ssl_key: str | None = setting(
        "SSL_KEY", _existing_file, "PEM files, required with `ENABLE_SSL=true`"
    )
    deployments: tuple[Deployment, ...] = assembled(
        *(variable for variable, _ in SINGLE_DEPLOYMENT), AZURE_AUTH, DEPLOYMENTS_FILE, default=()
    )
    parameter_defaults: Mapping[str, Any] = assembled(*PARAMETER_VARIABLES, default=_empty_mapping)
    caller_keys: tuple[CallerKey, ...] = assembled(API_KEYS, default=())
    auth_oidc_issuer: str | None = setting(
        "AUTH_OIDC_ISSUER",
        _issuer,
        "let callers send an OIDC bearer token (JWT) from this issuer instead of a key, e.g. "
        "`https://login.microsoftonline.com/<tenant>/v2.0`; needs `AUTH_OIDC_AUDIENCE`",
    )
    auth_oidc_audience: str | None = setting(
        "AUTH_OIDC_AUDIENCE", str, "the `aud` callers' tokens must carry, e.g. `api://<app id>`"
    )
    auth_oidc_default_key: str | None = setting(
        "AUTH_OIDC_DEFAULT_KEY",
        str,
        "the `keys:` entry a valid token matching no entry's `oidc:` is served as; unset: 403",
    )
    redis_url: Secret | None = setting(
        "REDIS_URL",
        _redis_url,
        "share quotas and usage across instances (`redis://host:6379/0`)",
    )
    quota_on_redis_error: str = setting(
        "QUOTA_ON_REDIS_ERROR",
        _redis_error_mode,
        "`open` admits when Redis is down, `closed` answers 503",
        "open",
    )
    response_affinity_ttl: float = setting(
        "RESPONSE_AFFINITY_TTL",
        _seconds,
        "s, how long the deployment holding a stored response is remembered (in Redis with "
        "`REDIS_URL`); Azure keeps responses 30 days",
        30 * 24 * 3600.0,
    )
    default_completion_tokens: int = setting(
        "DEFAULT_COMPLETION_TOKENS",
        _integer(1),
        "tokens admission charges for the answer of a request that sets no `max_tokens` / "
        "`max_completion_tokens` / `max_output_tokens` (corrected to Azure's count afterwards)",
        1024,
    )
    tiktoken_cache_dir: str | None = setting(
        "TIKTOKEN_CACHE_DIR",
        _existing_dir,
        "directory of pre-seeded tiktoken encoding files, for exact prompt-token estimates "
        "(none: a character estimate that errs high; see Token estimates)",
    )
    metrics_key: Secret | None = setting(
        "METRICS_KEY", Secret, "require this key for `GET /metrics`"
    )
    max_body_size: int = setting(
        "MAX_BODY_SIZE", _integer(1), "request body limit in bytes (413 beyond)", 1024 * 1024
    )
    max_other_body_size: int = setting(
        "MAX_OTHER_BODY_SIZE",
        _integer(0),
        "body limit in bytes on routes that take no JSON body (`GET`s, unknown paths): refused "
        "at once with a 413, without reading it, and the connection closed",
        4 * 1024,
    )
    max_json_depth: int = setting(
        "MAX_JSON_DEPTH",
        _integer(1, MAX_JSON_DEPTH_LIMIT),
        "deepest nesting of arrays and objects in a body (1 to 254; 400 beyond). The deepest "
        "request examples in Azure's and OpenAI's specs nest 6 and 8 levels",
        64,
    )
    max_header_size: int = setting(
        "MAX_HEADER_SIZE",
        _integer(1024),
        "bytes of request line and headers (431 beyond, with a short body; past 4 × this the "
        "connection is closed unanswered, as reading must stop somewhere)",
        64 * 1024,
    )
    body_timeout: float = setting(
        "BODY_TIMEOUT",
        _seconds,
        "s, from the end of a request's headers to the end of its body: a slow or missing body "
        "gets a 408 and the connection is closed",
        30.0,
    )
    keep_alive_timeout: float = setting(
        "KEEP_ALIVE_TIMEOUT",
        _seconds,
        "s, an idle keep-alive connection stays open; also how long a request's headers may "
        "take (then the connection is closed, as there is no request to answer)",
        65.0,
    )
    max_clients: int = setting(
        "MAX_CLIENTS",
        _integer(1),
        "concurrent upstream requests, so also open streams per process (more wait for a "
        "slot; raise it for more: a slot costs nothing until used), and the most upstream "
        "connections kept open; idle ones are reused, most recent first",
        1000,
    )
    # "http"/"https" -> proxy URL (it may hold a password), "no" -> NO_PROXY's list.
    proxies: Mapping[str, Secret] = assembled(*PROXY_VARIABLES, default=_empty_mapping)
    connect_timeout: float = setting(
        "CONNECT_TIMEOUT", _seconds, "s, to open a connection to Azure", 5.0
    )
    first_byte_timeout: float = setting(
        "FIRST_BYTE_TIMEOUT",
        _seconds,
        "s, from sending a stream request to Azure's response headers",
        60.0,
    )
    stream_idle_timeout: float = setting(
        "STREAM_IDLE_TIMEOUT",
        _seconds,
        "s, between two events of a stream (no stream is cut for being long, nor for a "
        "caller that reads slowly)",
        60.0,
    )
    stream_keepalive: float = setting(
        "STREAM_KEEPALIVE",
        _non_negative_seconds,
        "s of silence in a started stream after which the caller gets a `: keep-alive` SSE "
        "comment (0 = never)",
        15.0,
    )
    request_timeout: float = setting(
        "REQUEST_TIMEOUT", _seconds, "s, a whole non-stream call", 600.0
    )
    max_attempts: int = setting("MAX_ATTEMPTS", _integer(1, 10), "upstream attempts per request", 3)
    max_retry_wait: float = setting(
        "MAX_RETRY_WAIT",
        _non_negative_seconds,
        "s, the longest wait for a cooling-down deployment",
        10.0,
    )
    routing: str = setting(
        "ROUTING",
        _routing,
        "within a priority group: `weighted` by `weight`, or `least-busy` (fewest requests in "
        "flight)",
        "weighted",
    )
    max_cooldown: float = setting(
        "MAX_COOLDOWN",
        _seconds,
        "s, the longest a deployment rests after a failure, whatever Azure's `retry-after-ms` "
        "says; also caps the `Retry-After` passed to callers",
        60.0,
    )
    drain_timeout: float = setting(
        "DRAIN_TIMEOUT",
        _seconds,
        "s, for in-flight requests to finish on SIGTERM/SIGINT",
        30.0,
    )
    drain_grace: float = setting(
        "DRAIN_GRACE",
        _non_negative_seconds,
        "s, `/readyz` answers 503 before the listener closes",
        0.0,
    )
    cors_origins: tuple[str, ...] = setting(
        "CORS_ORIGINS", _origins, "`*` or a comma-separated list of allowed origins", ("*",)
    )
    log_format: str = setting(
        "LOG_FORMAT",
        _log_format,
        "access-log format",
        "json",
        shown="`json` if stdout is not a terminal, else `text`",
    )
    tracing: TracingSettings = assembled(*TRACING_VARIABLES, default=TracingSettings())


def variables() -> list[Variable]:
    """Every variable the settings are read from, in the README table's order."""
    return [
        variable
        for settings_field in dataclasses.fields(Settings)
        for variable in settings_field.metadata[_VARIABLES]
    ]


def _simple_fields() -> list[tuple[str, Variable]]:
    """(attribute, variable) of every setting read from one variable."""
    return [
        (settings_field.name, settings_field.metadata[_VARIABLES][0])
        for settings_field in dataclasses.fields(Settings)
        if not settings_field.metadata.get(_ASSEMBLED)
    ]


def readme_table() -> str:
    """The README's configuration table; variables that share a meaning share a row."""
    rows: list[tuple[list[str], str, str]] = []
    for variable in variables():
        if rows and rows[-1][2] == variable.doc and rows[-1][1] == variable.default_text:
            rows[-1][0].append(variable.name)
        else:
            rows.append(([variable.name], variable.default_text, variable.doc))
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [
        f"| {', '.join(f'`{name}`' for name in names)} | {default} | {doc} |"
        for names, default, doc in rows
    ]
    return "\n".join(lines)


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

    def cast(variable: Variable, into: dict[str, Any], attribute: str) -> None:
        if variable.name in values:
            try:
                into[attribute] = variable.cast(values[variable.name])
            except ValueError as error:
                problems.append(f"{variable.name}: {error}")

    simple: dict[str, Any] = {}
    for attribute, variable in _simple_fields():
        cast(variable, simple, attribute)

    deployments: tuple[Deployment, ...] = ()
    caller_keys: list[CallerKey] = []
    if API_KEYS.name in values:
        caller_keys += keys_from_api_keys(values[API_KEYS.name])
    if DEPLOYMENTS_FILE.name in values:
        try:
            document = read_yaml(values[DEPLOYMENTS_FILE.name])
            deployments = load_deployments(document, values)
            if isinstance(document, dict) and document.get("keys"):
                caller_keys += keys_from_yaml(document["keys"], values)
        except ConfigError as error:
            problems.extend(error.problems)
    else:
        single: dict[str, Any] = {}
        for variable, attribute in SINGLE_DEPLOYMENT:
            if variable.name in values:
                cast(variable, single, attribute)
            elif attribute != "key":
                problems.append(f"{variable.name}: is required (or set {DEPLOYMENTS_FILE.name})")
        try:
            entra = auth_from_settings(
                values.get(AZURE_AUTH.name, ""), single.get("key"), values.get(AZURE_CLIENT_ID, "")
            )
        except ConfigError as error:
            problems.extend(error.problems)
        else:
            if len(single.keys() - {"key"}) == len(SINGLE_DEPLOYMENT) - 1:
                single.setdefault("key", None)
                deployments = (
                    Deployment(
                        name=single["deployment"],
                        models=(single["deployment"],),
                        entra=entra,
                        **single,
                    ),
                )

    parameters: dict[str, Any] = {}
    for variable in PARAMETER_VARIABLES:
        cast(variable, parameters, variable.name)

    if simple.get("enable_ssl"):
        for name in ("SSL_CERT", "SSL_KEY"):
            if name not in values:
                problems.append(f"{name}: is required when ENABLE_SSL is true")

    proxies = read_proxies(values, problems)
    tracing = TracingSettings()
    try:
        tracing = load_tracing_settings(values)
    except ConfigError as error:
        problems.extend(error.problems)

    names = [key.name for key in caller_keys]
    problems.extend(
        f"API_KEYS/DEPLOYMENTS_FILE keys: the name {name!r} is used twice"
        for name in sorted({n for n in names if names.count(n) > 1})
    )
    keyed = [key.key for key in caller_keys if key.key is not None]
    if len(set(keyed)) < len(keyed):
        problems.append("API_KEYS/DEPLOYMENTS_FILE keys: the same key is given twice")
    problems.extend(oidc_problems(simple, caller_keys))
    if problems:
        raise ConfigError(problems)
    return Settings(
        deployments=deployments,
        caller_keys=tuple(caller_keys),
        parameter_defaults=MappingProxyType(parameters),
        proxies=MappingProxyType(proxies),
        tracing=tracing,
        **simple,
    )


def oidc_problems(simple: Mapping[str, Any], caller_keys: list[CallerKey]) -> list[str]:
    """What makes the AUTH_OIDC_* settings unusable together, and with the keys."""
    issuer, audience = simple.get("auth_oidc_issuer"), simple.get("auth_oidc_audience")
    default = simple.get("auth_oidc_default_key")
    problems = []
    if issuer and not audience:
        problems.append("AUTH_OIDC_AUDIENCE: is required when AUTH_OIDC_ISSUER is set")
    if audience and not issuer:
        problems.append("AUTH_OIDC_ISSUER: is required when AUTH_OIDC_AUDIENCE is set")
    if default and not issuer:
        problems.append("AUTH_OIDC_DEFAULT_KEY: needs AUTH_OIDC_ISSUER")
    names = [key.name for key in caller_keys]
    if default and default not in names:
        problems.append(
            f"AUTH_OIDC_DEFAULT_KEY: must name an entry of keys: in DEPLOYMENTS_FILE "
            f"({default!r} is not one)"
        )
    if issuer and not default and not any(key.oidc for key in caller_keys):
        problems.append(
            "AUTH_OIDC_ISSUER: no keys: entry has oidc: and AUTH_OIDC_DEFAULT_KEY is unset, "
            "so no token could be served"
        )
    return problems


def read_proxies(values: Mapping[str, str], problems: list[str]) -> dict[str, Secret]:
    """HTTP_PROXY, HTTPS_PROXY and NO_PROXY as curl reads them (the lower-case name wins)."""
    proxies: dict[str, Secret] = {}
    for variable in PROXY_VARIABLES:
        scheme = variable.name.split("_")[0].lower()
        for name in (variable.name, variable.name.lower()):
            if values.get(name):
                proxies[scheme] = Secret(values[name])
                if scheme != "no":
                    try:
                        parse_proxy_url(values[name], name)
                    except ValueError as error:
                        problems.append(str(error))
    return proxies
