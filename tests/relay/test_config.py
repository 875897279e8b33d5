"""Settings (relay.config): defaults < TOML file < environment < CLI, conversion, validation.

All of it is plain code: every test passes its own ``environ`` mapping, so
nothing here reads or changes the real environment.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import TYPE_CHECKING, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import config
from relay.config import FIELDS, ConfigError, Settings

if TYPE_CHECKING:
    from pathlib import Path


def write_toml(tmp_path: Path, text: str) -> str:
    """Write a TOML config file and return its path."""
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def value_types(name: str) -> tuple[type, ...]:
    """The runtime types a value of field ``name`` may have."""
    default = FIELDS[name].default
    return (str, type(None)) if default is None else (type(default),)


def sample(name: str) -> tuple[str, object]:
    """An environment value for field ``name`` that differs from its default, and its
    converted value."""
    special: dict[str, tuple[str, object]] = {
        "host": ("0.0.0.0", "0.0.0.0"),  # noqa: S104 - a value, not a bind
        "step_base_url": ("http://step.test", "http://step.test"),
        "glm_base_url": ("http://glm.test:8080", "http://glm.test:8080"),
        "log_level": ("DEBUG", "DEBUG"),
        "upstream_proxy": ("http://proxy.test:3128", "http://proxy.test:3128"),
        "redis_url": ("redis://redis.test:6379/1", "redis://redis.test:6379/1"),
        "default_provider": ("GLM", "glm"),  # any case, as when it was a fixed choice
        "openai_upstreams": (
            '[{"name": "up", "base_url": "http://up.test/v1", "api_keys": ["k"], "prefix": "up/"}]',
            (config.OpenAIUpstream("up", "http://up.test/v1", ("k",), (), "up/"),),
        ),
    }
    if name in special:
        return special[name]
    default = FIELDS[name].default
    hint = typing.get_type_hints(Settings)[name]
    if isinstance(hint, types.UnionType):  # str | None
        return (f"/srv/{name}", f"/srv/{name}")
    if typing.get_origin(hint) is Literal:
        other = next(a for a in typing.get_args(hint) if a != default)
        return (str(other).upper(), other)
    if hint is bool:
        return ("on", True) if not default else ("off", False)
    if hint is int:
        assert isinstance(default, int)
        return (str(default + 7), default + 7)
    if hint is float:
        assert isinstance(default, float)
        return (str(default + 1.5), default + 1.5)
    if typing.get_origin(hint) is tuple:
        return (f" {name}-a , {name}-b,, ", (f"{name}-a", f"{name}-b"))
    assert hint is str, hint
    return (f"{name}-value", f"{name}-value")


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    """With no file, environment or flags, the settings are the documented defaults."""
    s = config.load(environ={})
    assert s == Settings()
    assert (s.host, s.port, s.uds, s.workers) == ("127.0.0.1", 8000, None, 1)
    assert s.step_base_url == "https://yuewen.cn"
    assert s.glm_base_url == "https://chatglm.cn"
    assert (s.default_provider, s.reasoning, s.log_format) == ("step", "field", "text")
    assert s.allow_private_urls is False
    assert s.api_keys == s.step_tokens == s.glm_tokens == ()
    assert (s.connect_timeout, s.first_byte_timeout, s.stall_timeout) == (10.0, 120.0, 120.0)
    assert (s.header_timeout, s.keepalive_timeout) == (10.0, 60.0)
    assert s.upstream_proxy is None
    assert s.certfile is None
    assert s.keyfile is None


def test_settings_are_frozen() -> None:
    """A Settings object cannot be changed in place; with_changes makes a validated copy."""
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    changed = s.with_changes(port="9000")
    assert (changed.port, s.port) == (9000, 8000)
    with pytest.raises(ConfigError, match="override: port"):
        s.with_changes(port=70000)


# --- precedence -----------------------------------------------------------------------------


def test_file_then_environment_then_cli(tmp_path: Path) -> None:
    """Each layer overrides the one before: defaults < TOML file < environment < CLI."""
    path = write_toml(tmp_path, 'host = "10.1.1.1"\nport = 1111\nlog_format = "json"\n')
    from_file = config.load(config_file=path, environ={})
    assert (from_file.host, from_file.port, from_file.log_format) == ("10.1.1.1", 1111, "json")
    with_env = config.load(config_file=path, environ={"RELAY_PORT": "2222"})
    assert (with_env.host, with_env.port) == ("10.1.1.1", 2222)
    with_cli = config.load({"port": "3333", "host": None}, config_file=path,
                           environ={"RELAY_PORT": "2222"})
    assert (with_cli.host, with_cli.port, with_cli.log_format) == ("10.1.1.1", 3333, "json")


def test_relay_config_names_the_file(tmp_path: Path) -> None:
    """Without --config, RELAY_CONFIG names the TOML file."""
    path = write_toml(tmp_path, "port = 4444\n")
    assert config.load(environ={"RELAY_CONFIG": path}).port == 4444


def test_related_settings_may_come_from_different_sources(tmp_path: Path) -> None:
    """certfile from the file and keyfile from the environment together are valid: the
    settings are judged once all layers are applied, not layer by layer."""
    path = write_toml(tmp_path, 'certfile = "/srv/cert.pem"\n')
    s = config.load(config_file=path, environ={"RELAY_KEYFILE": "/srv/key.pem"})
    assert (s.certfile, s.keyfile) == ("/srv/cert.pem", "/srv/key.pem")
    s = config.load({"certfile": "/c.pem"}, environ={"RELAY_KEYFILE": "/k.pem"})
    assert (s.certfile, s.keyfile) == ("/c.pem", "/k.pem")


def test_every_field_has_an_environment_variable() -> None:
    """Each field NAME is read from RELAY_<NAME> and converted to its type."""
    environ = {}
    expected = {}
    for name in FIELDS:
        environ["RELAY_" + name.upper()], expected[name] = sample(name)
    s = config.load(environ=environ)
    for name, value in expected.items():
        assert getattr(s, name) == value, name
    assert set(config.from_environ(environ)) == set(FIELDS)


def test_every_field_has_a_toml_key(tmp_path: Path) -> None:
    """Each field is also read from the same name in lower case in the TOML file."""
    lines = []
    expected = {}
    for name in FIELDS:
        text, expected[name] = sample(name)
        if name == "openai_upstreams":  # JSON text (double quotes) as a TOML literal string
            lines.append(f"{name} = '{text}'")
            continue
        lines.append(f"{name} = {text!r}".replace("'", '"'))
    s = config.load(config_file=write_toml(tmp_path, "\n".join(lines)), environ={})
    for name, value in expected.items():
        assert getattr(s, name) == value, name


def test_environment_variables_that_name_no_setting_are_ignored() -> None:
    """Other RELAY_* variables (RELAY_CONFIG, typos) and unrelated ones do not count."""
    environ = {"RELAY_PORTT": "1", "PORT": "2", "RELAY_CONFIG": ""}
    assert config.from_environ(environ) == {}
    assert config.load(environ=environ) == Settings()


# --- conversion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "on", "On"])
def test_true_spellings(text: str) -> None:
    """1/true/yes/on in any case, with spaces, are true."""
    assert config.load(environ={"RELAY_ALLOW_PRIVATE_URLS": text}).allow_private_urls is True


@pytest.mark.parametrize("text", ["0", "false", "False", " no", "off", ""])
def test_false_spellings(text: str) -> None:
    """0/false/no/off (and empty) are false."""
    s = config.load({"demo": True}, environ={"RELAY_DEMO": text})
    assert s.demo is True  # the CLI wins ...
    assert config.load(environ={"RELAY_DEMO": text}).demo is False  # ... over the env


def test_bad_bool_names_the_source_and_setting() -> None:
    """A word that is no boolean is a ConfigError naming the environment and the setting."""
    with pytest.raises(ConfigError, match=r"environment: allow_private_urls: .*true or false"):
        config.load(environ={"RELAY_ALLOW_PRIVATE_URLS": "maybe"})


def test_lists_are_comma_separated() -> None:
    """RELAY_API_KEYS=k1, k2,,k3 gives three keys, stripped, empties dropped."""
    s = config.load(environ={"RELAY_API_KEYS": "k1, k2,,k3 ", "RELAY_GLM_TOKENS": ""})
    assert s.api_keys == ("k1", "k2", "k3")
    assert s.glm_tokens == ()


def test_toml_lists_and_native_types(tmp_path: Path) -> None:
    """A TOML array becomes a tuple; TOML booleans and numbers are taken as they are."""
    path = write_toml(tmp_path, 'step_tokens = ["a@b", "c@d"]\nallow_private_urls = true\n'
                                "stall_timeout = 2.5\nworkers = 3\n")
    s = config.load(config_file=path, environ={})
    assert s.step_tokens == ("a@b", "c@d")
    assert s.allow_private_urls is True
    assert (s.stall_timeout, s.workers) == (2.5, 3)


def test_choices_are_case_insensitive_and_checked() -> None:
    """RELAY_REASONING=TAGS is 'tags'; an unknown choice is a ConfigError listing the choices."""
    assert config.load(environ={"RELAY_REASONING": "TAGS"}).reasoning == "tags"
    with pytest.raises(ConfigError, match="environment: reasoning: must be one of field, tags"):
        config.load(environ={"RELAY_REASONING": "inline"})


def test_empty_optional_is_none() -> None:
    """An empty RELAY_UPSTREAM_PROXY means no proxy."""
    assert config.load(environ={"RELAY_UPSTREAM_PROXY": ""}).upstream_proxy is None


@pytest.mark.parametrize(
    ("environ", "cli", "pattern"),
    [
        ({"RELAY_PORT": "eighty"}, {}, "environment: port"),
        ({}, {"port": "eighty"}, "command line: port"),
        ({"RELAY_STALL_TIMEOUT": "-1"}, {}, "environment: stall_timeout: .*non-negative"),
        ({"RELAY_STALL_TIMEOUT": "nan"}, {}, "environment: stall_timeout"),
        ({"RELAY_CONNECT_TIMEOUT": "soon"}, {}, "environment: connect_timeout"),
        ({"RELAY_PORT": "70000"}, {}, "environment: port: 70000 is out of range"),
        ({}, {"port": "-1"}, "command line: port"),
        ({"RELAY_WORKERS": "0"}, {}, "environment: workers"),
        ({"RELAY_MAX_BODY_BYTES": "10"}, {}, "environment: max_body_bytes"),
        ({"RELAY_GLM_MAX_STREAMS": "0"}, {}, "environment: glm_max_streams"),
        ({"RELAY_STEP_BASE_URL": "ftp://x"}, {}, "environment: step_base_url"),
        ({}, {"glm_base_url": "chatglm.cn"}, "command line: glm_base_url"),
        ({"RELAY_LOG_LEVEL": "verbose"}, {}, "environment: log_level"),
    ],
)
def test_bad_values_name_their_source(
    environ: dict[str, str], cli: dict[str, object], pattern: str
) -> None:
    """A value that does not convert, or converts but cannot be used, is a ConfigError that
    names where it came from and which setting it is."""
    with pytest.raises(ConfigError, match=pattern):
        config.load(cli, environ=environ)


def test_bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    """A wrong type in the TOML file is a ConfigError naming the file and the setting."""
    path = write_toml(tmp_path, 'port = "eighty"\n')
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: port")):
        config.load(config_file=path, environ={})
    path = write_toml(tmp_path, "host = 127\n")
    with pytest.raises(ConfigError, match="host: must be a string"):
        config.load(config_file=path, environ={})


def test_toml_float_is_not_truncated_to_an_int(tmp_path: Path) -> None:
    """``port = 8000.5`` in the file is an error, not silently port 8000."""
    path = write_toml(tmp_path, "port = 8000.5\n")
    with pytest.raises(ConfigError, match="port: must be an integer"):
        config.load(config_file=path, environ={})


def test_toml_bool_is_not_a_number(tmp_path: Path) -> None:
    """``workers = true`` is an error, not one worker."""
    path = write_toml(tmp_path, "workers = true\n")
    with pytest.raises(ConfigError, match="workers: must be an integer"):
        config.load(config_file=path, environ={})


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    """A misspelt key in the file is refused, naming the key and the file."""
    path = write_toml(tmp_path, "prot = 8000\n")
    with pytest.raises(ConfigError, match=r"config file .*: unknown setting 'prot'"):
        config.load(config_file=path, environ={})


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    """Settings are top-level keys; a [table] is an unknown setting."""
    path = write_toml(tmp_path, "[server]\nport = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'server'"):
        config.load(config_file=path, environ={})


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    """A missing file or a TOML syntax error is a ConfigError naming the file."""
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        config.load(config_file=missing, environ={})
    broken = write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(ConfigError, match=r"relay\.toml"):
        config.load(config_file=broken, environ={})


def test_certfile_without_keyfile_is_an_error(tmp_path: Path) -> None:
    """TLS needs both files: either one alone is a ConfigError naming its source."""
    with pytest.raises(ConfigError, match=r"command line: certfile: .*go together"):
        config.load({"certfile": "/srv/cert.pem"}, environ={})
    with pytest.raises(ConfigError, match=r"environment: keyfile: .*go together"):
        config.load(environ={"RELAY_KEYFILE": "/srv/key.pem"})
    path = write_toml(tmp_path, 'certfile = "/srv/cert.pem"\n')
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: certfile")):
        config.load(config_file=path, environ={})


def test_unknown_cli_name_is_an_error() -> None:
    """A name that is no setting is refused even from code (the CLI builds names from
    the fields, so this only catches programming errors)."""
    with pytest.raises(ConfigError, match="command line: unknown setting 'colour'"):
        config.load({"colour": "blue"}, environ={})


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FIELDS)), text=st.text(max_size=20))
def test_any_text_converts_or_is_a_config_error(name: str, text: str) -> None:
    """Any string for any setting gives Settings or a ConfigError naming the environment,
    never another exception."""
    outcome: Settings | ConfigError
    try:
        outcome = config.load(environ={"RELAY_" + name.upper(): text})
    except ConfigError as exc:
        outcome = exc
    if isinstance(outcome, ConfigError):
        assert str(outcome).startswith("environment: ")
    else:
        assert isinstance(getattr(outcome, name), value_types(name))


@settings(max_examples=100, deadline=None)
@given(port=st.integers(0, 65535))
def test_any_port_in_range_round_trips(port: int) -> None:
    """Every valid port number given as text comes back as that integer."""
    assert config.load(environ={"RELAY_PORT": str(port)}).port == port


def test_readme_documents_every_setting() -> None:
    """The README's configuration table names every RELAY_* variable."""
    import dataclasses
    import pathlib

    from relay.config import Settings

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [
        f"RELAY_{f.name.upper()}"
        for f in dataclasses.fields(Settings)
        if f"`RELAY_{f.name.upper()}`" not in readme
    ]
    assert missing == []
