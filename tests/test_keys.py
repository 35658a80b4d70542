"""Caller keys: API_KEYS, the YAML keys section, authentication and model checks."""

from __future__ import annotations

import hashlib
import hmac
import logging

import pytest
import yaml
from tornado.httputil import HTTPHeaders

from gateway.errors import ConfigError, GatewayError
from gateway.policy.keys import CallerKey, KeyRing, keys_from_api_keys, keys_from_yaml
from gateway.secret import Secret

ALICE_KEY = "sk-alice-0f3c9d2e7b"
BOB_KEY = "sk-bob-5a8e1c4f92"


def yaml_problems(text: str, environ: dict[str, str] | None = None, **kwargs: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        keys_from_yaml(yaml.safe_load(text)["keys"], environ or {}, **kwargs)
    return caught.value.problems


def test_fingerprint_is_a_sha256_prefix_and_the_key_hides_in_repr():
    key = CallerKey(name="alice", key=Secret(ALICE_KEY))
    assert key.fingerprint == hashlib.sha256(ALICE_KEY.encode()).hexdigest()[:12]
    assert ALICE_KEY not in repr(key) and ALICE_KEY not in str(key)


def test_api_keys_are_named_in_order_and_blanks_skipped():
    keys = keys_from_api_keys(" first , ,second,,third ,")
    assert [(key.name, key.key.reveal()) for key in keys] == [
        ("key1", "first"),
        ("key2", "second"),
        ("key3", "third"),
    ]
    assert all(key.rpm is None and key.tpm is None and key.models is None for key in keys)
    assert not any(key.admin for key in keys)
    assert keys_from_api_keys("") == [] and keys_from_api_keys(" , ") == []


def test_api_keys_repeated_key_names_both_positions_not_the_key():
    with pytest.raises(ConfigError) as caught:
        keys_from_api_keys("same-secret,other,same-secret")
    assert caught.value.problems == ["API_KEYS: key3 is the same key as key1"]
    assert "same-secret" not in str(caught.value)


def test_yaml_keys_with_limits_models_and_variables():
    text = """
keys:
  - name: alice
    key: ${ALICE_KEY}
    rpm: 60
    tpm: 40000
    models: [gpt-4o, gpt-4o-mini]
  - name: bob
    key: prefix-${BOB_PART}-suffix
  - name: ops
    key: literal-ops-key
    admin: true
"""
    environ = {"ALICE_KEY": ALICE_KEY, "BOB_PART": "b0b"}
    alice, bob, ops = keys_from_yaml(yaml.safe_load(text)["keys"], environ)
    assert alice == CallerKey(
        name="alice",
        key=Secret(ALICE_KEY),
        rpm=60,
        tpm=40000,
        models=("gpt-4o", "gpt-4o-mini"),
    )
    assert bob.key.reveal() == "prefix-b0b-suffix" and bob.rpm is None and bob.models is None
    assert ops.admin is True and ops.key.reveal() == "literal-ops-key"


def test_unset_or_empty_variable_names_it_and_the_entry():
    text = """
keys:
  - name: alice
    key: ${ALICE_KEY}
  - name: bob
    key: x-${BOB_KEY}
"""
    assert yaml_problems(text, {"BOB_KEY": ""}) == [
        "DEPLOYMENTS_FILE keys[0] (alice).key: environment variable ALICE_KEY is not set",
        "DEPLOYMENTS_FILE keys[1] (bob).key: environment variable BOB_KEY is not set",
    ]


def test_the_source_prefix_is_the_callers():
    problems = yaml_problems("keys:\n  - {name: a, key: '${NOPE}'}\n", source="KEYS_FILE")
    assert problems == ["KEYS_FILE keys[0] (a).key: environment variable NOPE is not set"]


def test_two_entries_with_one_key_name_both_and_never_the_key():
    text = """
keys:
  - {name: alice, key: "${SHARED}"}
  - {name: bob, key: other}
  - {name: carol, key: the-shared-value}
"""
    problems = yaml_problems(text, {"SHARED": "the-shared-value"})
    assert problems == [
        "DEPLOYMENTS_FILE keys[2] (carol).key: is the same key as keys[0] (alice); "
        "every entry needs its own key"
    ]
    assert "the-shared-value" not in "\n".join(problems)


def test_duplicate_names_are_an_error():
    problems = yaml_problems("keys:\n  - {name: alice, key: a}\n  - {name: alice, key: b}\n")
    assert problems == [
        "DEPLOYMENTS_FILE keys[1] (alice).name: repeats keys[0] (alice); names must be unique"
    ]


def test_schema_errors_name_the_entry_and_the_field_one_line_each():
    text = """
keys:
  - {name: alice, key: a, rpm: 60}
  - {name: bob, key: b, rpm: 0, tpm: lots, models: [], admin: "yes"}
  - {key: c, rmp: 5}
  - {name: "", key: 42}
  - just-a-string
"""
    problems = yaml_problems(text)
    assert sorted(problems) == sorted(
        [
            "DEPLOYMENTS_FILE keys[1] (bob).rpm: must be an integer >= 1",
            "DEPLOYMENTS_FILE keys[1] (bob).tpm: must be an integer >= 1",
            "DEPLOYMENTS_FILE keys[1] (bob).models: must be a non-empty list of model names",
            "DEPLOYMENTS_FILE keys[1] (bob).admin: must be true or false",
            "DEPLOYMENTS_FILE keys[2].name: is required",
            "DEPLOYMENTS_FILE keys[2].rmp: is not a known field "
            "(allowed: name, key, rpm, tpm, tokens_per_day, tokens_per_month, usd_per_month, "
            "models, admin, oidc)",
            "DEPLOYMENTS_FILE keys[3].name: must be a non-empty string",
            "DEPLOYMENTS_FILE keys[3].key: must be a non-empty string (the key, or ${VAR})",
            "DEPLOYMENTS_FILE keys[4]: must be a mapping with at least name and key",
        ]
    )


def test_keys_section_must_be_a_list():
    assert yaml_problems("keys: {alice: a}\n") == [
        "DEPLOYMENTS_FILE keys: must be a list of key entries"
    ]


def test_schema_error_messages_never_contain_the_key():
    problems = yaml_problems(f"keys:\n  - {{name: alice, key: {ALICE_KEY}, rpm: -1}}\n")
    assert problems == ["DEPLOYMENTS_FILE keys[0] (alice).rpm: must be an integer >= 1"]


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(
        [
            CallerKey(name="alice", key=Secret(ALICE_KEY), models=("gpt-4o",)),
            CallerKey(name="bob", key=Secret(BOB_KEY)),
        ]
    )


def test_open_ring_lets_everyone_in():
    open_ring = KeyRing([])
    assert open_ring.is_open
    assert open_ring.authenticate({}) is None
    assert open_ring.authenticate({"api-key": "anything"}) is None
    open_ring.check_model(None, ["any-model"])


@pytest.mark.parametrize(
    "headers",
    [
        {"api-key": BOB_KEY},
        {"API-Key": BOB_KEY},
        {"Authorization": f"Bearer {BOB_KEY}"},
        {"authorization": f"bearer {BOB_KEY}"},
        HTTPHeaders({"Api-Key": BOB_KEY}),
        HTTPHeaders({"Authorization": f"Bearer {BOB_KEY}"}),
    ],
)
def test_authenticate_reads_either_header(ring, headers):
    assert not ring.is_open
    assert ring.authenticate(headers).name == "bob"


def test_api_key_header_wins_over_authorization(ring):
    headers = {"api-key": ALICE_KEY, "Authorization": f"Bearer {BOB_KEY}"}
    assert ring.authenticate(headers).name == "alice"


@pytest.mark.parametrize(
    "headers",
    [{}, {"api-key": ""}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {BOB_KEY}"}],
)
def test_missing_key_is_a_401(ring, headers):
    with pytest.raises(GatewayError) as caught:
        ring.authenticate(headers)
    assert caught.value.status == 401 and caught.value.code == "missing_api_key"
    assert caught.value.headers == {"WWW-Authenticate": "Bearer"}
    assert BOB_KEY not in caught.value.message


def test_unknown_key_is_a_401_that_does_not_repeat_it(ring):
    presented = "sk-not-a-real-key-123"
    for headers in ({"api-key": presented}, {"Authorization": f"Bearer {presented}"}):
        with pytest.raises(GatewayError) as caught:
            ring.authenticate(headers)
        error = caught.value
        assert error.status == 401 and error.code == "invalid_api_key"
        assert presented not in str(error.error_object()) and presented not in str(error)


def test_every_key_is_compared_in_constant_time(ring, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for presented in (ALICE_KEY, BOB_KEY, "sk-unknown"):
        calls.clear()
        try:
            ring.authenticate({"api-key": presented})
        except GatewayError:
            pass
        # Every configured key is compared, whichever matched (or none), and
        # only fixed-length digests, so neither count nor length tells anything.
        assert len(calls) == 2
        assert all(len(a) == len(b) == 32 for a, b in calls)


def test_check_model(ring):
    alice = ring.authenticate({"api-key": ALICE_KEY})
    bob = ring.authenticate({"api-key": BOB_KEY})
    ring.check_model(alice, ["gpt-4o"])
    ring.check_model(alice, ["some-alias", "gpt-4o"])
    ring.check_model(bob, ["anything"])
    with pytest.raises(GatewayError) as caught:
        ring.check_model(alice, ["gpt-35-turbo"])
    error = caught.value
    assert error.status == 403 and error.code == "model_not_allowed"
    assert "gpt-35-turbo" in error.message and ALICE_KEY not in error.message


def test_ring_refuses_two_keys_with_one_value():
    with pytest.raises(ValueError):
        KeyRing([CallerKey("a", Secret("same")), CallerKey("b", Secret("same"))])


def test_nothing_here_logs_a_key(ring, caplog):
    caplog.set_level(logging.DEBUG)
    ring.authenticate({"api-key": ALICE_KEY})
    with pytest.raises(GatewayError):
        ring.authenticate({"api-key": "sk-unknown-xyz"})
    with pytest.raises(ConfigError):
        keys_from_yaml([{"name": "a", "key": ALICE_KEY}, {"name": "b", "key": ALICE_KEY}], {})
    assert ALICE_KEY not in caplog.text and "sk-unknown-xyz" not in caplog.text
