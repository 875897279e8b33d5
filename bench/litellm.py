"""LiteLLM's proxy beside the relay: install it apart, start it on the bench's emulator.

Theory of operation
-------------------
The gateway benchmark compares the relay with LiteLLM's proxy on the same
OpenAI-compatible emulator, in the same run: ``python -m bench overhead
--provider openai --gateway litellm="$(python -m bench.litellm relay-cmd)"``
(or ``--gateway "$(python -m bench.litellm gateway)"``, which prints that
``NAME=CMD`` whole) measures it beside the relay, turn by turn;
``--relay-cmd "$(python -m bench.litellm relay-cmd)"`` measures it alone.

- ``python -m bench.litellm install`` makes a virtual environment of its own
  (:data:`DEFAULT_VENV`, ``.bench-venvs/litellm`` in the checkout, ignored
  by git) and installs ``litellm[proxy]`` from the package registry, pinned
  (:data:`LITELLM_REQUIREMENT`), so that its hundred-odd dependencies never
  meet the relay's. The pin is the newest release whose ``proxy`` extra
  resolves on the registry this project uses: from 1.108 on, the extra
  needs ``litellm-proxy`` and ``litellm-proxy-extras`` releases that are
  not published there; 1.107.0 was a compromised release and is gone.
- ``python -m bench.litellm serve --host H --port P --upstream URL --token
  KEY`` is what the relay command runs (:data:`RELAY_CMD`): it writes the
  proxy's config (:func:`render_config`: one ``model_list`` entry, the
  bench's model served by LiteLLM's ``openai/`` provider at the emulator's
  ``/v1`` base URL with the emulator's key) into the working directory
  (``bench overhead`` runs gateways in its log directory) and *replaces
  itself* with the proxy (``os.execve``), so the process the bench watches
  for CPU and memory is LiteLLM's, not a wrapper's.
- The proxy must not reach out: this machine has no internet beside the
  registry, and a fetch that waits for a time-out would be measured as
  LiteLLM's start, or worse, its first token. :data:`OFFLINE_ENV` keeps the
  model cost map local (``LITELLM_LOCAL_MODEL_COST_MAP``), telemetry and
  the feedback box off, Hugging Face offline (tokenizers are never
  downloaded), and the admin UI and the docs pages unserved.

The config gives LiteLLM nothing that adds work per request: no master key
(so no key checks and no database, like the relay without
``RELAY_API_KEYS``; LiteLLM refuses to start keyless unless told
``dangerously_permit_weak_or_unset_master_key``, fine on loopback), no
callbacks, spend logs and cost tracking off, logging at ERROR. Its
upstream connection pool is not capped below the bench's load
(:data:`UNCAPPED_ENV`), as the relay's is not.
``--workers N`` is passed as ``--num_workers`` (uvicorn workers on one
port); ``bench overhead`` fills it from ``{workers}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: The checkout this module belongs to.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: Where ``install`` puts LiteLLM's own virtual environment (git-ignored).
DEFAULT_VENV = SOURCE_ROOT / ".bench-venvs" / "litellm"
#: What ``install`` asks the registry for (see the module docstring for the pin).
LITELLM_REQUIREMENT = "litellm[proxy]==1.106.12"
#: The file ``serve`` writes the proxy's config to, in its working directory.
CONFIG_NAME = "litellm-config.yaml"
#: The model the bench asks for (``bench.upstreams.OPENAI_MODEL``).
DEFAULT_MODEL = "emu-chat"
#: The ``--relay-cmd`` of ``bench overhead`` that runs LiteLLM's proxy on the emulator.
RELAY_CMD = (
    "{python} -m bench.litellm serve --host {host} --port {port} --upstream {upstream}"
    " --token {token} --workers {workers}"
)
#: The name ``python -m bench.litellm gateway`` gives it in ``--gateway NAME=CMD``.
GATEWAY_NAME = "litellm"
#: LiteLLM's switches that keep the proxy from reaching the internet or doing extra work.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: LiteLLM's upstream connection caps raised past any scenario (its defaults are 1,000
#: in all and 500 per host; 0 would not lift them: LiteLLM then leaves the cap to
#: aiohttp, whose default is 100). The relay has no such cap, and with it LiteLLM held
#: 500 of the idle scenario's 1,000 streams open and left the rest waiting.
UNCAPPED_ENV = {
    "AIOHTTP_CONNECTOR_LIMIT": "100000",
    "AIOHTTP_CONNECTOR_LIMIT_PER_HOST": "100000",
}


def render_config(upstream: str, token: str, model: str = DEFAULT_MODEL) -> str:
    """The proxy's YAML config: ``model`` served by the upstream at ``upstream``.

    Args:
        upstream: the emulator's OpenAI base URL (ending in ``/v1``).
        token: the upstream API key.
        model: the name clients ask for; sent upstream as the same name.

    Returns:
        YAML text. Every string is written as a JSON string, which YAML reads
        as the same string, so no value can break the file.
    """

    def q(text: str) -> str:
        return json.dumps(text)

    return (
        "model_list:\n"
        f"  - model_name: {q(model)}\n"
        "    litellm_params:\n"
        f"      model: {q('openai/' + model)}\n"
        f"      api_base: {q(upstream)}\n"
        f"      api_key: {q(token)}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
        "  json_logs: false\n"
        "  request_timeout: 600\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
        "  disable_end_user_cost_tracking: true\n"
        "  dangerously_permit_weak_or_unset_master_key: true\n"
    )


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    return venv / "bin" / "python"


def serve_argv(venv: Path, host: str, port: int, config: Path, workers: int) -> list[str]:
    """argv of LiteLLM's proxy in ``venv`` with ``config`` on ``host:port``."""
    argv = [str(venv / "bin" / "litellm"), "--config", str(config)]
    argv += ["--host", host, "--port", str(port)]
    if workers > 1:
        argv += ["--num_workers", str(workers)]
    return argv


def install(venv: Path, requirement: str = LITELLM_REQUIREMENT) -> int:
    """Make ``venv`` (if missing) and install ``requirement`` into it; pip's exit status."""
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # noqa: S603
    command = [str(venv_python(venv)), "-m", "pip", "install", requirement]
    return subprocess.run(command, check=False).returncode  # noqa: S603


def serve(args: argparse.Namespace) -> int:
    """Write the config and exec the proxy (returns only when it cannot be started)."""
    venv = Path(args.venv)
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(
            f"bench.litellm: {binary} is missing; run: python -m bench.litellm install",
            file=sys.stderr,
        )
        return 2
    config = Path(CONFIG_NAME).resolve()
    config.write_text(render_config(args.upstream, args.token, args.model), encoding="utf-8")
    env = {**os.environ, **OFFLINE_ENV, **UNCAPPED_ENV}
    env.pop("PYTHONPATH", None)  # the bench's checkout is none of LiteLLM's business
    argv = serve_argv(venv, args.host, args.port, config, args.workers)
    os.execve(argv[0], argv, env)  # noqa: S606 - the proxy replaces this process


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.litellm``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.litellm",
        description="LiteLLM's proxy for the gateway benchmark (bench overhead --provider openai).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    setup = sub.add_parser("install", help="install litellm[proxy] into its own venv")
    setup.add_argument("--venv", default=str(DEFAULT_VENV), help="where (default: %(default)s)")
    setup.add_argument("--requirement", default=LITELLM_REQUIREMENT, help="pip requirement")
    run = sub.add_parser("serve", help="write the config and exec the proxy")
    run.add_argument("--venv", default=str(DEFAULT_VENV))
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--upstream", required=True, help="the emulator's base URL, .../v1")
    run.add_argument("--token", required=True, help="the upstream API key")
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--workers", type=int, default=1, help="uvicorn workers (--num_workers)")
    sub.add_parser("relay-cmd", help="print the --relay-cmd of bench overhead")
    sub.add_parser("gateway", help=f"print the --gateway of bench overhead ({GATEWAY_NAME}=...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m bench.litellm``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "install":
        return install(Path(args.venv), args.requirement)
    if args.command == "serve":
        return serve(args)
    if args.command == "gateway":
        print(f"{GATEWAY_NAME}={RELAY_CMD}")
        return 0
    print(RELAY_CMD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
