"""Generated requests on every route, over real sockets: never a 5xx, never an upstream call for a refused body.

Bodies are drawn from our own schema files (`schema/`, bundled as the
gateway bundles them), then mutated: wrong types, nulls, huge numbers, deep
nesting, lone surrogates and odd Unicode, unknown and repeated keys, NaN,
other encodings, cut or damaged bytes. hypothesis-jsonschema 0.23.1 drew
bodies for these schemas at 40-100 ms each (their `if`/`then` unions; and it
needs a Hypothesis before 6.170.10), too slow for thousands, so
`from_our_schema` turns the keywords our files use into plain Hypothesis
strategies.

The run is derandomized (the same examples on every run) and sized for CI;
a larger one on demand:

    PROPERTY_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_body_properties.py
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator import AzureEmulator
from gateway.config import load_settings
from gateway.validation import bundle, load_registry
from handlers.app import make_app
from handlers.listeners import GatewayServer

from .conftest import API_VERSION, DEPLOYMENT, EMULATOR_KEY

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "2500"))
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REQUEST_TIMEOUT = 30.0
AZURE_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
# Error codes the gateway answers with itself: such an answer must never follow an upstream call.
REFUSALS = {
    "invalid_json", "invalid_request", "body_too_large", "unsupported_media_type", "headers_too_large",
    "not_found", "method_not_allowed", "model_not_found", "DeploymentNotFound", "404",
}  # fmt: skip


# --- schema files -> strategies ---------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def merged(*schemas: dict[str, Any]) -> dict[str, Any]:
    """The schemas as one: properties merged, required joined, any other keyword the last one's."""
    out: dict[str, Any] = {}
    for schema in schemas:
        for key, value in schema.items():
            if key == "properties":
                out[key] = {**out.get(key, {}), **value}
            elif key == "required":
                out[key] = sorted({*out.get(key, []), *value})
            else:
                out[key] = value
    return out


def from_our_schema(schema: Any) -> st.SearchStrategy[Any]:
    """Values mostly valid under `schema`, for the keywords our schema files use."""
    if not isinstance(schema, dict) or not schema:
        return json_values
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    rest = {key: value for key, value in schema.items() if key not in ("anyOf", "oneOf")}
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        return st.one_of([from_our_schema(merged(rest, sub)) for sub in alternatives])
    if "allOf" in schema:
        base = {key: value for key, value in schema.items() if key != "allOf"}
        branches = [
            merged(base, entry.get("if", {}), entry.get("then", {})) for entry in schema["allOf"]
        ]
        return st.one_of([from_our_schema(branch) for branch in branches])
    if "if" in schema:
        base = {key: value for key, value in schema.items() if key not in ("if", "then", "else")}
        return from_our_schema(
            merged(base, schema["if"], schema.get("then", {}))
        ) | from_our_schema(merged(base, schema.get("else", {})))
    types = schema.get("type")
    if types is None:
        return json_values
    return st.one_of(
        [_of_type(name, schema) for name in (types if isinstance(types, list) else [types])]
    )


def _of_type(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if name == "null":
        return st.none()
    if name == "boolean":
        return st.booleans()
    if name == "integer":
        return st.integers(low, high)
    if name == "number":
        low = schema.get("exclusiveMinimum", low)
        return st.integers(low, high) | st.floats(low, high, allow_nan=False, allow_infinity=False)
    if name == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=12)
    if name == "array":
        low = schema.get("minItems", 0)
        return st.lists(
            from_our_schema(schema.get("items")),
            min_size=low,
            max_size=min(schema.get("maxItems", 3), low + 2),
        )
    properties = schema.get("properties", {})
    if not properties:
        keys = from_our_schema({"type": "string", **schema.get("propertyNames", {})})
        extra = schema.get("additionalProperties", True)
        return st.dictionaries(
            keys, from_our_schema(extra if isinstance(extra, dict) else {}), max_size=3
        )
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {key: from_our_schema(properties.get(key, {})) for key in sorted(required)},
        optional={
            key: from_our_schema(value) for key, value in properties.items() if key not in required
        },
    )


def field_names(schema: Any) -> set[str]:
    """Every property name in `schema`, at any depth: where mutations do the most harm."""
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            names.update(
                node.get("properties", {}) if isinstance(node.get("properties"), dict) else ()
            )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


REGISTRY = load_registry()
SCHEMAS = {
    name: bundle(f"{name}.schema.json", REGISTRY) for name in ("gpt_chat", "chat_completions")
}
BODIES = {name: from_our_schema(schema) for name, schema in SCHEMAS.items()}
FIELD_NAMES = sorted(set().union(*map(field_names, SCHEMAS.values())))
TOP_LEVEL = {name: sorted(schema["properties"]) for name, schema in SCHEMAS.items()}


# --- mutations ----------------------------------------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
nasty_values = st.one_of(
    st.none(), st.booleans(), st.just(""), st.just({}), st.just([]),
    st.integers(2**63 - 2, 2**70), st.integers(-(2**70), -(2**63) + 2),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 1e-7, 3, -1, 0]),
    st.text(st.characters() | surrogates, max_size=12),
    st.integers(40, 120).map(lambda levels: json.loads("[" * levels + "]" * levels)),
    json_values,
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, document: Any, top_level: list[str]) -> Any:
    """`document` with up to three of its fields, or values inside them, made wrong.

    Half the changes set one of the schema's own fields (`top_level`) to a
    hostile value, where each keyword of the schema is met first; the others
    replace, remove or add a value at any depth. Rarely, the whole body is replaced.
    """
    # (Hypothesis leans to the first of sampled values: the common case comes first.)
    if draw(st.sampled_from([False] * 15 + [True])):
        return copy.deepcopy(draw(nasty_values))
    body = copy.deepcopy(document)  # drawn values may be shared (st.just): never change them
    for _ in range(draw(st.sampled_from([1, 1, 2, 0, 3]))):
        if draw(st.booleans()):
            body[draw(st.sampled_from(top_level))] = copy.deepcopy(draw(nasty_values))
            continue
        parent: Any = body
        key = draw(st.sampled_from(sorted(parent))) if parent else None
        while (
            key is not None
            and isinstance(parent[key], (dict, list))
            and parent[key]
            and draw(st.booleans())
        ):
            parent = parent[key]
            key = draw(
                st.sampled_from(sorted(parent) if isinstance(parent, dict) else range(len(parent)))
            )
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if key is None or (action == "add" and isinstance(parent, dict)):
            parent[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = copy.deepcopy(
                draw(nasty_values)
            )
        elif action == "remove":
            del parent[key]
        else:
            parent[key] = copy.deepcopy(draw(nasty_values))
    return body


def with_repeated_key(raw: bytes, document: Any, value: bytes) -> bytes:
    key = next(iter(document))
    return raw[:-1] + b"," + json.dumps(key).encode() + b":" + value + b"}"


@st.composite
def encoded(draw: st.DrawFn, document: Any) -> bytes:
    """`document` as bytes, mostly as JSON, sometimes broken in one of the ways callers break it."""
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")
    damage = draw(
        st.sampled_from(["none"] * 6 + ["repeat", "nan", "bom", "utf-16", "utf-32", "cut", "byte"])
    )
    if damage == "repeat" and isinstance(document, dict) and document:
        return with_repeated_key(
            raw, document, draw(st.sampled_from([b"true", b"null", b'"gpt-4o-mini"', b"[]"]))
        )
    if damage == "nan" and isinstance(document, dict):
        return (
            raw[:-1]
            + (b"," if document else b"")
            + b'"temperature":'
            + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400"]))
            + b"}"
        )
    if damage == "bom":
        return b"\xef\xbb\xbf" + raw
    if damage in ("utf-16", "utf-32"):
        return text.encode(
            draw(st.sampled_from([f"{damage}", f"{damage}-le", f"{damage}-be"])), "surrogatepass"
        )
    if damage == "cut" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if damage == "byte" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return raw


# --- a gateway and its emulator on a loop of their own ----------------------


class LiveGateway:
    """The gateway and the Azure emulator served from a background thread, for a blocking client."""

    def __init__(self, env_file: str) -> None:
        self.env_file = env_file
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(REQUEST_TIMEOUT)

    def start(self) -> None:
        self.thread.start()
        self.emulator = AzureEmulator(key=EMULATOR_KEY, deployments=(DEPLOYMENT,))
        self.run(lambda: self.emulator.start("127.0.0.1", 0))
        settings = load_settings({
            "ENV_FILE": self.env_file, "HOST": "127.0.0.1", "HTTP_PORT": "0", "ENDPOINT": self.emulator.url,
            "DEPLOYMENT_NAME": DEPLOYMENT, "API_VERSION": API_VERSION, "KEY": EMULATOR_KEY, "MAX_ATTEMPTS": "1",
        })  # fmt: skip

        async def listen() -> None:
            # Built on the loop that serves it: the upstream client binds to the current loop.
            self.server = GatewayServer(make_app(settings), settings)
            self.server.start()

        self.run(listen)
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", self.server.ports["http"], timeout=REQUEST_TIMEOUT
        )

    def stop(self) -> None:
        self.connection.close()
        self.run(self.server.shutdown)
        self.run(self.emulator.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(REQUEST_TIMEOUT)
        self.loop.close()

    def upstream_calls(self) -> int:
        return len(self.emulator.requests)

    def send(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            self.connection.close()  # the next example starts on a new connection
            raise AssertionError(f"{method} {path} {body[:300]!r}: {error!r}") from None


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> LiveGateway:
    env_file = tmp_path_factory.mktemp("properties") / "empty.env"
    env_file.write_text("")
    gateway = LiveGateway(str(env_file))
    gateway.start()
    yield gateway
    gateway.stop()


def check(live: LiveGateway, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    before = live.upstream_calls()
    status, answer = live.send(method, path, body, headers)
    assert status < 500, (status, answer[:300], body[:300])
    if status >= 400 and answer.startswith(b"{"):
        code = json.loads(answer)["error"]["code"]
        if code in REFUSALS:
            assert live.upstream_calls() == before, (code, body[:300])


# --- the properties -----------------------------------------------------------

chat_routes = st.sampled_from([
    ("gpt_chat", "/v1/gpt/chat"),
    ("chat_completions", "/v1/chat/completions"),
    ("chat_completions", f"{AZURE_PATH}?api-version={API_VERSION}"),
    ("chat_completions", AZURE_PATH),
    ("chat_completions", f"/openai/deployments/nowhere/chat/completions?api-version={API_VERSION}"),
])  # fmt: skip


@settings(PROPERTY_SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data())
def test_chat_routes_never_fail_and_never_forward_a_refused_body(live, data):
    schema, path = data.draw(chat_routes)
    document = data.draw(mutated(data.draw(BODIES[schema]), TOP_LEVEL[schema]))
    body = data.draw(encoded(document))
    content_type = data.draw(
        st.sampled_from(
            ["application/json"] * 8 + ["application/json; charset=utf-16", "text/plain"]
        )
    )
    check(live, "POST", path, body, {"Content-Type": content_type})


ROUTE_OF = {"gpt_chat": "/v1/gpt/chat", "chat_completions": "/v1/chat/completions"}


@pytest.mark.parametrize(
    "schema, field", [(schema, field) for schema in SCHEMAS for field in TOP_LEVEL[schema]]
)
@settings(PROPERTY_SETTINGS, max_examples=max(1, EXAMPLES // 100))
@given(data=st.data())
def test_each_field_made_wrong_alone_is_refused_cleanly(live, schema, field, data):
    # One wrong field and nothing else: the describer then has to put words to its own keyword.
    document = copy.deepcopy(data.draw(BODIES[schema]))
    document[field] = copy.deepcopy(data.draw(nasty_values))
    check(
        live,
        "POST",
        ROUTE_OF[schema],
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )


other_routes = st.sampled_from(
    [
        "/v1",
        "/v1/",
        "/v1/models",
        "/v1/usage",
        "/metrics",
        "/healthz",
        "/readyz",
        "/nowhere",
        "/v1/gpt/chat",
    ]
)


@settings(PROPERTY_SETTINGS, max_examples=max(1, EXAMPLES // 5))
@given(
    path=other_routes,
    method=st.sampled_from(["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "POST"]),
    body=st.binary(max_size=6000) | st.builds(lambda n: b"[" * n, st.integers(0, 6000)),
)
def test_other_routes_never_fail_whatever_body_comes(live, path, method, body):
    if method == "POST" and path == "/v1/gpt/chat":
        method = "PUT"  # the chat routes have their own property
    check(live, method, path, body, {"Content-Type": "application/json"})
