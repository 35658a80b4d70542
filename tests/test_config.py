"""Settings: sources, precedence, casting and the problems reported."""

from pathlib import Path

import pytest

from gateway.config import load_settings, readme_table, variables
from gateway.errors import ConfigError
from gateway.secret import Secret
from gateway.upstream.urls import upstream_url

REQUIRED = {
    "ENDPOINT": "https://example.openai.azure.com/",
    "DEPLOYMENT_NAME": "gpt-4o",
    "API_VERSION": "2024-10-21",
    "KEY": "k-0123456789abcdef",
}


def settings(tmp_path: Path, file_text: str = "", **env: str):
    env_file = tmp_path / "test.env"
    env_file.write_text(file_text)
    return load_settings({"ENV_FILE": str(env_file), **env})


def problems(tmp_path: Path, file_text: str = "", **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, file_text, **env)
    return caught.value.problems


def test_defaults_and_upstream_url(tmp_path):
    loaded = settings(tmp_path, **REQUIRED)
    assert loaded.host == "0.0.0.0"
    assert loaded.http_port == 80 and loaded.https_port == 443
    assert loaded.enable_ssl is False
    assert loaded.max_body_size == 1024 * 1024
    assert loaded.max_clients == 1000
    assert dict(loaded.parameter_defaults) == {}
    assert upstream_url(loaded.deployments[0], "chat/completions") == (
        "https://example.openai.azure.com/openai/deployments/gpt-4o"
        "/chat/completions?api-version=2024-10-21"
    )


def test_endpoint_with_or_without_trailing_slash_and_http(tmp_path):
    without = settings(tmp_path, **{**REQUIRED, "ENDPOINT": "http://127.0.0.1:9999"})
    with_slash = settings(tmp_path, **{**REQUIRED, "ENDPOINT": "http://127.0.0.1:9999/"})
    assert upstream_url(without.deployments[0], "chat/completions") == upstream_url(
        with_slash.deployments[0], "chat/completions"
    )
    assert upstream_url(without.deployments[0], "chat/completions").startswith(
        "http://127.0.0.1:9999/openai/"
    )


def test_env_file_is_read_and_environment_wins(tmp_path):
    text = "".join(f"{name}={value}\n" for name, value in REQUIRED.items())
    text += "temperature=0.3\nHTTP_PORT=8080\n"
    loaded = settings(tmp_path, text, temperature="1.5")
    assert loaded.parameter_defaults["temperature"] == 1.5
    assert loaded.http_port == 8080


def test_empty_environment_value_does_not_hide_the_file(tmp_path):
    text = "".join(f"{name}={value}\n" for name, value in REQUIRED.items())
    text += "max_tokens=50\n"
    loaded = settings(tmp_path, text, max_tokens="", KEY="")
    assert loaded.parameter_defaults["max_tokens"] == 50
    assert loaded.deployments[0].key.reveal() == REQUIRED["KEY"]


def test_empty_value_means_unset_in_the_file_too(tmp_path):
    loaded = settings(tmp_path, "user=\nstop=\n", **REQUIRED)
    assert "user" not in loaded.parameter_defaults
    assert "stop" not in loaded.parameter_defaults


def test_parameter_defaults_are_cast(tmp_path):
    loaded = settings(
        tmp_path,
        **REQUIRED,
        temperature="0.7",
        top_p="0.5",
        n="2",
        stream="true",
        max_tokens="100",
        presence_penalty="-1",
        frequency_penalty="1.5",
        user="team-a",
    )
    assert dict(loaded.parameter_defaults) == {
        "temperature": 0.7,
        "top_p": 0.5,
        "n": 2,
        "stream": True,
        "max_tokens": 100,
        "presence_penalty": -1.0,
        "frequency_penalty": 1.5,
        "user": "team-a",
    }


def test_stop_is_a_string_or_a_json_array(tmp_path):
    plain = settings(tmp_path, **REQUIRED, stop="END")
    array = settings(tmp_path, 'stop=["\\n","END"]\n', **REQUIRED)
    assert plain.parameter_defaults["stop"] == "END"
    assert array.parameter_defaults["stop"] == ["\n", "END"]


def test_missing_required_values_are_each_named(tmp_path):
    found = problems(tmp_path)
    assert found == [
        "ENDPOINT: is required (or set DEPLOYMENTS_FILE)",
        "DEPLOYMENT_NAME: is required (or set DEPLOYMENTS_FILE)",
        "API_VERSION: is required (or set DEPLOYMENTS_FILE)",
        "KEY: is required (or set DEPLOYMENTS_FILE, or AZURE_AUTH=entra for Entra ID)",
    ]


def test_bad_values_name_variable_and_rule(tmp_path):
    found = problems(
        tmp_path,
        **{**REQUIRED, "ENDPOINT": "example.com"},
        temperature="abc",
        top_p="2",
        n="0",
        ENABLE_SSL="maybe",
        HTTP_PORT="http",
        stop='["a","b","c","d","e"]',
    )
    assert "temperature: must be a number from 0 to 2" in found
    assert "top_p: must be a number from 0 to 1" in found
    assert "n: must be an integer from 1 to 128" in found
    assert "ENABLE_SSL: must be true or false" in found
    assert "HTTP_PORT: must be an integer from 0 to 65535" in found
    assert "stop: must be a string or a JSON array of 1 to 4 strings" in found
    assert "ENDPOINT: must be a URL starting with https:// (or http://)" in found
    assert len(found) == 7


def test_ssl_needs_existing_files(tmp_path):
    found = problems(tmp_path, **REQUIRED, ENABLE_SSL="true", SSL_CERT="/nonexistent/cert.pem")
    assert "SSL_CERT: must name an existing file (/nonexistent/cert.pem not found)" in found
    assert "SSL_KEY: is required when ENABLE_SSL is true" in found


def test_missing_env_file_named_by_env_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings({"ENV_FILE": str(tmp_path / "nope.env"), **REQUIRED})
    assert caught.value.problems[0].startswith("ENV_FILE: must name an existing file")


def test_key_never_appears_in_repr_or_problems(tmp_path):
    loaded = settings(tmp_path, **REQUIRED)
    assert REQUIRED["KEY"] not in repr(loaded)
    assert repr(loaded.deployments[0].key) == "Secret('**********')"
    found = problems(tmp_path, **{**REQUIRED, "temperature": "hot"})
    assert all(REQUIRED["KEY"] not in line for line in found)


def test_secret_compares_by_value():
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


def test_proxies_from_environment_or_file_lower_case_winning(tmp_path):
    loaded = settings(
        tmp_path,
        "HTTPS_PROXY=http://file-proxy:3128\n",
        https_proxy="http://user:s3cret-pw@proxy:3128",
        HTTP_PROXY="proxy:8080",
        NO_PROXY="localhost,.internal",
        **REQUIRED,
    )
    assert {scheme: url.reveal() for scheme, url in loaded.proxies.items()} == {
        "https": "http://user:s3cret-pw@proxy:3128",
        "http": "proxy:8080",
        "no": "localhost,.internal",
    }
    assert "s3cret-pw" not in repr(loaded)
    assert settings(tmp_path, **REQUIRED).proxies == {}


def test_a_proxy_that_is_not_plain_http_is_a_config_error(tmp_path):
    found = problems(tmp_path, HTTPS_PROXY="https://user:s3cret-pw@proxy:3128")
    assert "HTTPS_PROXY: only http:// proxies are supported (got https://)" in found
    assert not any("s3cret-pw" in problem for problem in found)


def test_readme_table_is_the_declared_settings():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert readme_table() in readme
    documented = {variable.name for variable in variables()}
    assert {
        "HOST",
        "KEY",
        "DEPLOYMENTS_FILE",
        "temperature",
        "NO_PROXY",
        "LOG_FORMAT",
    } <= documented


def test_admission_routing_and_keepalive_settings(tmp_path):
    loaded = settings(tmp_path, **REQUIRED)
    assert loaded.stream_keepalive == 15.0 and loaded.routing == "weighted"
    assert loaded.default_completion_tokens == 1024 and loaded.tiktoken_cache_dir is None
    chosen = settings(
        tmp_path,
        STREAM_KEEPALIVE="0",
        ROUTING="least-busy",
        DEFAULT_COMPLETION_TOKENS="256",
        TIKTOKEN_CACHE_DIR=str(tmp_path),
        **REQUIRED,
    )
    assert chosen.stream_keepalive == 0.0 and chosen.routing == "least-busy"
    assert chosen.default_completion_tokens == 256 and chosen.tiktoken_cache_dir == str(tmp_path)
    assert set(
        problems(
            tmp_path,
            STREAM_KEEPALIVE="-1",
            ROUTING="random",
            DEFAULT_COMPLETION_TOKENS="0",
            TIKTOKEN_CACHE_DIR=str(tmp_path / "absent"),
            **REQUIRED,
        )
    ) == {
        "STREAM_KEEPALIVE: must be a number of seconds >= 0",
        "ROUTING: must be weighted or least-busy",
        "DEFAULT_COMPLETION_TOKENS: must be an integer >= 1",
        f"TIKTOKEN_CACHE_DIR: must name an existing directory ({tmp_path / 'absent'} not found)",
    }


def test_request_limits_have_named_defaults_and_are_checked(tmp_path):
    loaded = settings(tmp_path, **REQUIRED)
    assert loaded.max_other_body_size == 4096 and loaded.max_header_size == 65536
    assert loaded.max_json_depth == 64
    assert loaded.body_timeout == 30 and loaded.keep_alive_timeout == 65
    assert loaded.max_cooldown == 60
    bad = {
        "MAX_JSON_DEPTH": "300",
        "BODY_TIMEOUT": "0",
        "MAX_COOLDOWN": "soon",
        "MAX_HEADER_SIZE": "9",
    }
    assert problems(tmp_path, **REQUIRED, **bad) == [
        "MAX_JSON_DEPTH: must be an integer from 1 to 254",
        "MAX_HEADER_SIZE: must be an integer >= 1024",
        "BODY_TIMEOUT: must be a number of seconds > 0",
        "MAX_COOLDOWN: must be a number of seconds > 0",
    ]
