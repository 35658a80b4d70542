"""How the gateway proves itself to Azure OpenAI: an `api-key`, or an Entra ID token.

Each deployment gets one auth object with the same small interface
(`UpstreamAuth`): `headers()` gives the headers for an attempt, `reject()`
is told that Azure answered 401 to them and says whether one more attempt
with fresh headers is worth it, `ready` says whether it can sign a request
now, `description` says which credential it is for the start-up log.

Entra tokens (PROTOCOL-v1.md section 2.1: scope
`https://cognitiveservices.azure.com/.default`, `Authorization: Bearer`)
come from azure-identity's async credentials. `TokenSources` keeps one
`TokenSource` per distinct identity, shared by every deployment that names
it; a source holds one token, refreshes it in the background ahead of its
expiry (`refresh_at`), lets concurrent needs share one acquisition, keeps a
still-valid token when a refresh fails and tries again with backoff. With
no usable token it raises a retryable 502 `upstream_auth_unavailable`, so
failover moves on as it does from a refused connection.

azure-identity keeps its own token cache in each credential and answers from
it until its own refresh point (5 minutes before expiry, never within 30 s
of its last request), and a refresh it fails there returns the cached token
without a word. So when a source needs a token other than the one it holds
(a refresh, or after a 401) and the credential hands back the same one, the
source replaces the credential with a new instance of the same identity,
whose cache is empty, and asks once more.

Token text appears in no log line, metric, error or repr: sources log the
credential's description and the failure's reason only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from azure.core.credentials import AccessTokenInfo
from azure.core.credentials_async import AsyncSupportsTokenInfo
from azure.identity import aio as identity

from gateway.errors import ConfigError, GatewayError
from gateway.secret import Secret

COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"

# A token is refreshed this long before it expires; one that lives less than
# twice as long is refreshed at half its life instead.
REFRESH_LEAD = 300.0
# A token is not sent once it has less than this left (or a quarter of its
# life, for short ones): it could expire on its way to Azure.
EXPIRY_MARGIN = 30.0
# Failed background refreshes are retried after 1, 2, 4, ... seconds, up to this.
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 60.0
# With no token, a request starts a new acquisition at most this often; in
# between it fails at once with the last failure's reason.
CALLER_RETRY_INTERVAL = 1.0
# One attempt to get a token (every credential kind, the Azure CLI's process included).
ACQUISITION_TIMEOUT = 15.0
# The longest failure reason quoted in an error message or log line.
MAX_REASON_LENGTH = 300

# The named credential kinds, and the options each may carry in `auth:`.
CREDENTIAL_OPTIONS: Mapping[str, frozenset[str]] = {
    "default": frozenset({"client_id"}),
    "managed_identity": frozenset({"client_id"}),
    "workload_identity": frozenset({"client_id", "tenant_id"}),
    "client_secret": frozenset({"client_id", "tenant_id", "client_secret"}),
    "azure_cli": frozenset({"tenant_id"}),
}
REQUIRED_OPTIONS: Mapping[str, frozenset[str]] = {
    "client_secret": frozenset({"client_id", "tenant_id", "client_secret"}),
}
ENTRA_SHORTHAND = "entra"  # `auth: entra`, and AZURE_AUTH=entra: the default chain
KEY_AUTH = "key"  # AZURE_AUTH=key (or unset): the api-key of KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntraOptions:
    """One Entra identity: a credential kind and its options. Equal options, one credential."""

    kind: str = "default"
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret: Secret | None = None

    @property
    def label(self) -> str:
        """The credential's name in metrics: the kind, and the client id when there is one."""
        return f"{self.kind}:{self.client_id}" if self.client_id else self.kind

    @property
    def description(self) -> str:
        """What the start-up log says about this identity: `entra: <credential>`."""
        return f"entra: {self.credential}"

    @property
    def credential(self) -> str:
        """The credential in words, for logs and error messages; never a secret."""
        if self.kind == "default":
            chain = (
                "the default chain (environment, workload identity, managed identity, Azure CLI)"
            )
            return chain + (f" with client_id {self.client_id}" if self.client_id else "")
        if self.kind == "managed_identity":
            which = f"client_id {self.client_id}" if self.client_id else "system-assigned"
            return f"managed identity ({which})"
        if self.kind == "workload_identity":
            return "workload identity" + _details(self.client_id, self.tenant_id)
        if self.kind == "client_secret":
            return "service principal" + _details(self.client_id, self.tenant_id)
        return "Azure CLI" + _details(None, self.tenant_id)


def _details(client_id: str | None, tenant_id: str | None) -> str:
    parts = [f"client_id {client_id}"] * bool(client_id) + [f"tenant {tenant_id}"] * bool(tenant_id)
    return f" ({', '.join(parts)})" if parts else ""


# --- configuration --------------------------------------------------------------


# `${VAR}` expansion: (the value, the variables it names that are unset). The deployments
# loader passes its own, so this module does not depend on it.
Expand = Callable[[str], tuple[str, list[str]]]


def parse_auth_entry(raw: Any, expand: Expand, where: str) -> EntraOptions:
    """The `auth:` of a deployments-file entry as EntraOptions, or a ConfigError naming `where`.

    `auth: entra` is the default chain; `auth: {kind: managed_identity,
    client_id: ...}` names one kind (CREDENTIAL_OPTIONS lists each kind's
    options). `client_secret` must be a `${VAR}` reference, so a secret is
    never written in the file; the schema (`$defs/auth` of
    deployments.schema.json) says the same, and this function checks it
    again for callers that did not run the schema.
    """
    if raw == ENTRA_SHORTHAND:
        return EntraOptions()
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}.auth: must be 'entra' or a mapping with a kind"])
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in CREDENTIAL_OPTIONS:
        raise ConfigError([f"{where}.auth.kind: must be one of {', '.join(CREDENTIAL_OPTIONS)}"])
    problems = []
    allowed = CREDENTIAL_OPTIONS[kind]
    for name in sorted(set(raw) - allowed - {"kind"}):
        problems.append(
            f"{where}.auth.{name}: is not an option of {kind} "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    for name in sorted(REQUIRED_OPTIONS.get(kind, frozenset()) - set(raw)):
        problems.append(f"{where}.auth.{name}: is required for {kind}")
    values: dict[str, str] = {}
    for name in sorted(allowed & set(raw)):
        value = raw[name]
        if not isinstance(value, str) or not value:
            problems.append(f"{where}.auth.{name}: must be a non-empty string")
            continue
        if name == "client_secret" and not (value.startswith("${") and value.endswith("}")):
            problems.append(f"{where}.auth.client_secret: must be ${{VAR}}, not the secret itself")
            continue
        expanded, missing = expand(value)
        problems.extend(
            f"{where}.auth.{name}: ${{{variable}}} is not set in the environment"
            for variable in missing
        )
        values[name] = expanded
    if problems:
        raise ConfigError(problems)
    secret = values.pop("client_secret", None)
    return EntraOptions(
        kind=kind,
        client_secret=Secret(secret) if secret is not None else None,
        **values,
    )


def auth_from_settings(
    azure_auth: str, key: Secret | None, azure_client_id: str = ""
) -> EntraOptions | None:
    """The single-deployment rule: None for the api-key in KEY, else the Entra identity.

    `AZURE_AUTH` is `key` (the default, also when empty), `entra` (the
    default chain, which reads azure-identity's own environment variables:
    AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET,
    AZURE_FEDERATED_TOKEN_FILE, IDENTITY_ENDPOINT, ...), or one kind by name
    (`managed_identity`, `workload_identity`, `azure_cli`; a service principal
    is the default chain with AZURE_CLIENT_SECRET set). KEY must then be
    empty, so that which one is used is never a guess. `azure_client_id`
    (AZURE_CLIENT_ID) picks a user-assigned managed identity; the other kinds
    read it from the environment themselves.
    """
    value = azure_auth.strip().lower()
    has_key = key is not None and bool(key.reveal())
    if value in ("", KEY_AUTH):
        if not has_key:
            raise ConfigError(
                ["KEY: is required (or set DEPLOYMENTS_FILE, or AZURE_AUTH=entra for Entra ID)"]
            )
        return None
    kind = "default" if value == ENTRA_SHORTHAND else value
    if kind not in CREDENTIAL_OPTIONS or kind == "client_secret":
        raise ConfigError(
            [
                "AZURE_AUTH: must be key, entra, managed_identity, workload_identity or azure_cli"
                " (a service principal: entra with AZURE_CLIENT_ID, AZURE_TENANT_ID and"
                " AZURE_CLIENT_SECRET set)"
            ]
        )
    if has_key:
        raise ConfigError(
            [f"KEY: must be empty when AZURE_AUTH={value} (Entra ID is used, not a key)"]
        )
    if kind == "managed_identity" and azure_client_id:
        return EntraOptions(kind=kind, client_id=azure_client_id)
    return EntraOptions(kind=kind)


def make_credential(options: EntraOptions) -> AsyncSupportsTokenInfo:
    """A new azure-identity async credential for `options`.

    azure-core's own retries are off (retry_total=0): the token source retries
    with its own backoff, and a request waiting for a first token should fail
    over quickly rather than wait out several retries.
    """
    if options.kind == "managed_identity":
        return identity.ManagedIdentityCredential(client_id=options.client_id, retry_total=0)
    if options.kind == "workload_identity":
        return identity.WorkloadIdentityCredential(
            client_id=options.client_id, tenant_id=options.tenant_id, retry_total=0
        )
    if options.kind == "client_secret":
        if options.client_id is None or options.tenant_id is None or options.client_secret is None:
            raise ValueError("client_secret needs client_id, tenant_id and client_secret")
        return identity.ClientSecretCredential(
            options.tenant_id, options.client_id, options.client_secret.reveal(), retry_total=0
        )
    if options.kind == "azure_cli":
        return identity.AzureCliCredential(tenant_id=options.tenant_id or "")
    if options.client_id:
        return identity.DefaultAzureCredential(
            managed_identity_client_id=options.client_id, retry_total=0
        )
    return identity.DefaultAzureCredential(retry_total=0)


# --- the auth objects --------------------------------------------------------------


class UpstreamAuth(Protocol):
    """What an upstream attempt needs from a deployment's credentials.

    When Azure answers 401, the attempt calls `reject(headers it sent)`; if
    that returns True it is made once more with new `headers()`, and a
    second 401 maps as any other.
    """

    @property
    def description(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def headers(self) -> dict[str, str]: ...

    def reject(self, headers: Mapping[str, str]) -> bool: ...


class ApiKeyAuth:
    """The `api-key` header; a 401 is final, since the same key would be refused again."""

    description = "api-key"
    ready = True

    def __init__(self, key: Secret) -> None:
        self._key = key

    async def headers(self) -> dict[str, str]:
        return {"api-key": self._key.reveal()}

    def reject(self, headers: Mapping[str, str]) -> bool:
        return False


class EntraAuth:
    """`Authorization: Bearer <token>` from a (shared) TokenSource."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    @property
    def description(self) -> str:
        return self._source.description

    @property
    def ready(self) -> bool:
        return self._source.ready

    async def headers(self) -> dict[str, str]:
        """The header for one attempt; a retryable 502 GatewayError when there is no token."""
        return {"Authorization": f"Bearer {await self._source.token()}"}

    def reject(self, headers: Mapping[str, str]) -> bool:
        """Azure answered 401 to `headers`: drop that token; the attempt may be retried once."""
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and token:
            self._source.drop(token)
        return True


# --- tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    value: str
    received: float
    expires_on: float

    def __repr__(self) -> str:
        return f"_Token(received={self.received}, expires_on={self.expires_on})"

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expires_on - self.received)

    @property
    def refresh_at(self) -> float:
        if self.lifetime < 2 * REFRESH_LEAD:
            return self.received + self.lifetime / 2
        return self.expires_on - REFRESH_LEAD

    @property
    def usable_until(self) -> float:
        return self.expires_on - min(EXPIRY_MARGIN, self.lifetime / 4)


class TokenUnavailable(GatewayError):
    """No usable Entra token: 502, retryable, so failover tries another deployment."""

    def __init__(self, credential: str, reason: str) -> None:
        super().__init__(
            502,
            "upstream_auth_unavailable",
            f"The gateway could not get an Entra ID token for Azure OpenAI from {credential}: "
            f"{reason}",
            retryable=True,
        )
        self.reason = reason


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, bounded, with its type when it says nothing."""
    if isinstance(error, TimeoutError):
        return f"no token within {ACQUISITION_TIMEOUT:g} s"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:MAX_REASON_LENGTH]


class TokenSource:
    """One identity's token for one scope: cached, refreshed ahead of expiry, shared."""

    def __init__(
        self,
        options: EntraOptions,
        *,
        new_credential: Callable[[EntraOptions], AsyncSupportsTokenInfo] = make_credential,
        scope: str = COGNITIVE_SERVICES_SCOPE,
        on_acquired: Callable[[str], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
        acquisition_timeout: float = ACQUISITION_TIMEOUT,
        first_retry_delay: float = FIRST_RETRY_DELAY,
        max_retry_delay: float = MAX_RETRY_DELAY,
    ) -> None:
        self.options = options
        self.scope = scope
        self._new_credential = new_credential
        self._credential = new_credential(options)
        self._on_acquired = on_acquired or (lambda label: None)
        self._on_failed = on_failed or (lambda label: None)
        self._acquisition_timeout = acquisition_timeout
        self._first_retry_delay = first_retry_delay
        self._max_retry_delay = max_retry_delay
        self._held: _Token | None = None
        self._dropped: _Token | None = None
        self._pending: asyncio.Future[_Token] | None = None
        self._failures = 0
        self._failed_at: float | None = None
        self._last_reason = ""
        self._changed = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    @property
    def description(self) -> str:
        return self.options.description

    @property
    def ready(self) -> bool:
        """True while a token is held that is still good to send."""
        return self._held is not None and time.time() < self._held.usable_until

    def start(self) -> None:
        """Get a first token and keep it fresh, in the background (idempotent)."""
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def token(self) -> str:
        """A token good to send now; waits only when none is held (shared with other waiters)."""
        self.start()
        held = self._held
        if held is not None and time.time() < held.usable_until:
            return held.value
        if (
            self._pending is None
            and self._failed_at is not None
            and time.monotonic() - self._failed_at < CALLER_RETRY_INTERVAL
        ):
            raise TokenUnavailable(self.options.credential, self._last_reason)
        return (await self._acquire()).value

    def drop(self, token: str) -> None:
        """Forget `token` (Azure refused it), so the next need gets another one."""
        if self._held is not None and self._held.value == token:
            self._dropped, self._held = self._held, None

    async def close(self) -> None:
        """Stop refreshing and close the credential's transport."""
        for task in (self._refresher, self._pending):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, GatewayError):
                    pass
        self._refresher = self._pending = None
        await self._credential.close()

    def _acquire(self) -> asyncio.Future[_Token]:
        """The acquisition in flight, or a new one: every concurrent need shares one."""
        if self._pending is None:
            pending = asyncio.ensure_future(self._fetch())
            pending.add_done_callback(self._acquisition_done)
            self._pending = pending
        return asyncio.shield(self._pending)

    def _acquisition_done(self, pending: asyncio.Future[_Token]) -> None:
        if self._pending is pending:
            self._pending = None
        if not pending.cancelled():
            pending.exception()  # a failure nobody waited for is not an unretrieved one

    async def _fetch(self) -> _Token:
        previous = self._held or self._dropped
        try:
            info = await self._ask()
            if previous is not None and info.token == previous.value:
                await self._replace_credential()
                info = await self._ask()
                # After a 401 (nothing held) the identity's answer stands, even the same token.
                if info.token == previous.value and self._held is not None:
                    raise RuntimeError("the identity gave back the token it is refreshing")
            if info.expires_on <= time.time():
                raise RuntimeError("the identity gave a token that has already expired")
        except Exception as error:
            self._failures += 1
            self._failed_at = time.monotonic()
            self._last_reason = _reason(error)
            self._on_failed(self.options.label)
            log.warning("entra: %s gave no token: %s", self.options.credential, self._last_reason)
            raise TokenUnavailable(self.options.credential, self._last_reason) from None
        now = time.time()
        token = _Token(info.token, received=now, expires_on=float(info.expires_on))
        self._held, self._dropped = token, None
        self._failures, self._failed_at = 0, None
        self._on_acquired(self.options.label)
        log.info(
            "entra: %s gave a token valid for %d s",
            self.options.credential,
            round(token.expires_on - now),
        )
        self._changed.set()
        return token

    async def _ask(self) -> AccessTokenInfo:
        return await asyncio.wait_for(
            self._credential.get_token_info(self.scope), self._acquisition_timeout
        )

    async def _replace_credential(self) -> None:
        old, self._credential = self._credential, self._new_credential(self.options)
        await old.close()

    def _next_refresh_delay(self) -> float:
        now = time.time()
        if self._failed_at is not None:
            backoff = min(
                self._max_retry_delay, self._first_retry_delay * 2 ** (self._failures - 1)
            )
            return max(0.0, self._failed_at + backoff - time.monotonic())
        if self._held is None:
            return 0.0
        return max(0.0, self._held.refresh_at - now)

    async def _refresh_forever(self) -> None:
        while True:
            self._changed.clear()
            delay = self._next_refresh_delay()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), delay)
                    continue  # a token arrived some other way: plan from it
                except TimeoutError:
                    pass
            try:
                await self._acquire()
            except TokenUnavailable:
                pass  # recorded by _fetch; the next delay is the backoff


class TokenSources:
    """One TokenSource per distinct identity, shared by the deployments that name it."""

    def __init__(self, **source_options: Any) -> None:
        self._source_options = source_options
        self._sources: dict[EntraOptions, TokenSource] = {}

    def auth(self, options: EntraOptions) -> EntraAuth:
        """The auth object for a deployment using `options`; its source is shared."""
        source = self._sources.get(options)
        if source is None:
            source = self._sources[options] = TokenSource(options, **self._source_options)
        return EntraAuth(source)

    @property
    def sources(self) -> tuple[TokenSource, ...]:
        return tuple(self._sources.values())

    @property
    def ready(self) -> bool:
        """True when every identity holds a token (and when there is none)."""
        return all(source.ready for source in self._sources.values())

    def start(self) -> None:
        for source in self._sources.values():
            source.start()

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
