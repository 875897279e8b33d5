"""The Dockerfile, docker-compose.yml and deploy/nginx.conf, checked without a Docker engine.

What is checked is what breaks silently: a flag in the ENTRYPOINT beats the
RELAY_* variable of the same setting (``-e RELAY_PORT=9000`` ignored), a
HEALTHCHECK that names port 8000 fails once the port changes, an image on a
Python that CI does not test, a compose file whose relays do not share one
Redis, and an nginx that buffers the streams or cuts them after a minute.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from relay.cli import HEALTHCHECK_TIMEOUT_S
from relay.config import FIELDS, Settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_FLAGS = {"--" + name.replace("_", "-") for name in FIELDS} | {
    "--no-" + name.replace("_", "-") for name in FIELDS}
SETTING_VARIABLES = {"RELAY_" + name.upper() for name in FIELDS}


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form is split as sh would."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(item) for item in parsed]
    return ["/bin/sh", "-c", *shlex.split(args)]


def env_defaults() -> dict[str, str]:
    """What the image's ENV instructions set (``ENV A=1 B=2`` form)."""
    out: dict[str, str] = {}
    for args in instruction("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            out[key] = value
    return out


def classifier_versions() -> set[tuple[int, int]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    found = re.findall(r"Programming Language :: Python :: (\d+)\.(\d+)",
                       cfg["metadata"]["classifiers"])
    return {(int(major), int(minor)) for major, minor in found}


def test_the_base_image_is_the_python_ci_tests() -> None:
    """Every stage's base image is python:X.Y-..., one X.Y for all, a version setup.cfg
    claims, and the one running these tests (CI runs them: the image gets what CI tried)."""
    bases = [args.split()[0] for args in instruction("FROM")]
    assert bases, "no FROM in the Dockerfile"
    versions = set()
    for base in bases:
        found = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?(?:-[\w.-]+)?(?:@sha256:\w+)?", base)
        assert found, f"FROM {base}: pin a python:X.Y image"
        versions.add((int(found[1]), int(found[2])))
    assert len(versions) == 1, f"the stages use different Pythons: {sorted(versions)}"
    (image,) = versions
    running = sys.version_info[:2]
    claimed = classifier_versions()
    assert image in claimed, (
        f"the Dockerfile's python:{image[0]}.{image[1]} is not among setup.cfg's classifiers "
        f"{sorted(claimed)}")
    assert image == running, (
        f"the Dockerfile pins python:{image[0]}.{image[1]} but these tests run on "
        f"{running[0]}.{running[1]}: the image would ship on a Python CI does not test. "
        f"Pin the image to the Python that .ci/run uses")


def test_the_entrypoint_passes_no_flag_that_beats_a_variable() -> None:
    """``ENTRYPOINT ["relay", "serve"]``: a setting's flag would beat its RELAY_* variable
    (flags come last in the precedence), so ``-e RELAY_PORT=9000`` would be ignored."""
    (entrypoint,) = instruction("ENTRYPOINT")
    argv = exec_form(entrypoint)
    assert argv[:2] == ["relay", "serve"], f"ENTRYPOINT {argv}: exec form, relay serve"
    for cmd in instruction("CMD"):
        argv += exec_form(cmd)
    flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("-")]
    overriding = sorted(set(flags) & SETTING_FLAGS)
    assert overriding == [], (
        f"ENTRYPOINT/CMD pass {overriding}, which beat the RELAY_* variables: set an ENV "
        "default instead")
    assert flags == [], f"ENTRYPOINT/CMD pass flags {flags}: configure through RELAY_*"


def test_the_image_listens_on_every_address_by_its_environment() -> None:
    """The container's defaults are ENV lines (RELAY_HOST=0.0.0.0, a RELAY_PORT), each one
    a real setting, so that any of them can be overridden with ``-e``."""
    env = env_defaults()
    assert env.get("RELAY_HOST") == "0.0.0.0"  # noqa: S104 (the container's address)
    assert env.get("RELAY_PORT", "").isdigit()
    unknown = sorted(k for k in env if k.startswith("RELAY_") and k not in SETTING_VARIABLES)
    assert unknown == [], f"ENV sets variables that are no setting: {unknown}"
    exposed = [port.split("/")[0] for args in instruction("EXPOSE") for port in args.split()]
    assert env["RELAY_PORT"] in exposed


def test_the_healthcheck_follows_the_settings() -> None:
    """The HEALTHCHECK names no port (it reads RELAY_PORT, as ``relay healthcheck`` does)
    and no scheme (RELAY_CERTFILE decides between http and https)."""
    (health,) = instruction("HEALTHCHECK")
    options, sep, command = health.partition("CMD ")
    assert sep, f"HEALTHCHECK {health!r}: expected a CMD"
    assert "8000" not in command, f"the HEALTHCHECK hardcodes port 8000: {command}"
    assert "http://" not in command
    assert "https://" not in command
    assert exec_form(command.strip())[:2] == ["relay", "healthcheck"]
    timeout = re.search(r"--timeout=(\d+)s", options)
    assert timeout, "a HEALTHCHECK --timeout in seconds"
    assert int(timeout[1]) > HEALTHCHECK_TIMEOUT_S, (
        "relay healthcheck must give up before Docker kills it")


# --- docker-compose.yml ---------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def relay_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the repository's Dockerfile."""
    out = {}
    for name, service in services.items():
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        if context in (".", "./"):
            out[name] = service
    return out


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> set[str]:
    return set(service.get("depends_on") or ())


def test_compose_runs_two_relays_on_one_redis() -> None:
    """Two relays from the Dockerfile, with one RELAY_REDIS_URL naming the compose file's
    Redis service, waiting for it; only real settings in their environment."""
    services = compose()["services"]
    relays = relay_services(services)
    assert len(relays) == 2, f"two relay services built from the Dockerfile: {sorted(relays)}"
    urls = {environment(service).get("RELAY_REDIS_URL") for service in relays.values()}
    assert len(urls) == 1, f"the relays use different Redis URLs: {urls}"
    (url,) = urls
    assert url is not None, "the relays need RELAY_REDIS_URL"
    found = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", url)
    assert found, url
    redis = services.get(found[1])
    assert redis is not None, f"RELAY_REDIS_URL names {found[1]}, which is no service"
    assert redis["image"].startswith("redis:7"), redis["image"]
    for name, service in relays.items():
        assert found[1] in depends_on(service), f"{name} does not wait for Redis"
        unknown = sorted(set(environment(service)) - SETTING_VARIABLES)
        assert unknown == [], f"{name}: variables that are no setting: {unknown}"


def test_compose_takes_the_secrets_from_the_environment() -> None:
    """API keys are required (``${RELAY_API_KEYS:?...}``: no relay open to anyone by
    mistake), the upstream accounts come from the caller's environment, and no secret is
    written into the file; the relays publish no port (nginx is the way in)."""
    for name, service in relay_services(compose()["services"]).items():
        env = environment(service)
        assert env["RELAY_API_KEYS"].startswith("${RELAY_API_KEYS:?"), name
        for variable in ("RELAY_GLM_TOKENS", "RELAY_STEP_TOKENS"):
            assert env[variable].startswith("${" + variable), (name, variable)
        assert "ports" not in service, f"{name} publishes a port: go through nginx"


def test_compose_puts_nginx_in_front_of_both_relays() -> None:
    """nginx waits for both relays, mounts deploy/nginx.conf, publishes the one port, and
    its upstream lists the relay services on the port the image listens on."""
    services = compose()["services"]
    relays = relay_services(services)
    nginx = next(s for s in services.values() if str(s.get("image", "")).startswith("nginx"))
    assert depends_on(nginx) >= set(relays), "nginx must depend on both relays"
    mounts = [str(v).split(":")[:2] for v in nginx.get("volumes", [])]
    assert ["./deploy/nginx.conf", "/etc/nginx/nginx.conf"] in mounts, mounts
    assert nginx.get("ports"), "nginx publishes the port clients use"
    port = env_defaults()["RELAY_PORT"]
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", nginx_conf(), re.M)
    assert sorted(servers) == sorted((name, port) for name in relays)


# --- deploy/nginx.conf ------------------------------------------------------------------------


def nginx_conf() -> str:
    """deploy/nginx.conf without its comments."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def directive(name: str) -> list[str]:
    """The arguments of every ``name ...;`` directive, as written."""
    return [m.strip() for m in re.findall(rf"^\s*{name}\s+([^;]*);", nginx_conf(), re.M)]


def seconds(value: str) -> int:
    found = re.fullmatch(r"(\d+)(s|m|h)?", value)
    assert found, value
    return int(found[1]) * {"s": 1, None: 1, "m": 60, "h": 3600}[found[2]]


def test_nginx_lets_streams_flow() -> None:
    """Streams reach the client chunk by chunk over HTTP/1.1 keep-alive connections to the
    relays, and a long answer is not cut by nginx's 60 s defaults."""
    assert directive("proxy_buffering") == ["off"]
    assert directive("proxy_cache") == ["off"]
    assert directive("proxy_http_version") == ["1.1"]
    assert directive("chunked_transfer_encoding") == ["on"]
    assert 'Connection ""' in directive("proxy_set_header")
    (keepalive,) = directive("keepalive")
    assert int(keepalive) > 0, "upstream keepalive connections"
    sse_keepalive = Settings().sse_keepalive
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directive(name)
        assert seconds(value) >= 3600, f"{name} {value}: streams and whole answers run long"
        assert seconds(value) > sse_keepalive


def test_nginx_passes_the_request_id_and_the_body_limit() -> None:
    """X-Request-Id goes to the relay (the client's, else nginx's own); the body limit is
    RELAY_MAX_BODY_BYTES' default, so the relay, not nginx, answers an oversized body;
    nginx drops idle upstream connections before the relay's keep-alive timeout does."""
    headers = directive("proxy_set_header")
    assert any(h.split()[0].lower() == "x-request-id" for h in headers), headers
    (size,) = directive("client_max_body_size")
    found = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert found, size
    unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[found[2].lower()]
    assert int(found[1]) * unit == Settings().max_body_bytes
    (idle,) = directive("keepalive_timeout")
    assert seconds(idle) < Settings().keepalive_timeout

