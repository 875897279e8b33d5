"""``python -m bench compare``: headline figures of overhead reports, side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import pytest

from bench.__main__ import main
from bench.compare import gateway_label, headlines, mode_label, sustained_levels
from bench.litellm import RELAY_CMD as LITELLM_CMD
from bench.upstreams import OPENAI

if TYPE_CHECKING:
    from pathlib import Path


def report(relay_cmd: str, shift: float) -> dict[str, Any]:
    """A small overhead report whose gateway adds ``shift`` to every latency."""

    def scenario(key: str, direct: dict[str, Any], relay: dict[str, Any]) -> dict[str, Any]:
        return {"key": key, "direct": direct, "relay": relay}

    sustained = scenario("sustained", {"sustained_streams": 512}, {"sustained_streams": 128})
    sustained["sustained"] = {
        "modes": {
            "direct": {"label": "direct", "sustained": 512},
            "relay_w1": {"label": "relay --workers 1", "sustained": 128},
            "relay_w2": {"label": "relay --workers 2", "sustained": None},
        }
    }
    return {
        "relay_cmd": relay_cmd,
        "machine": {"cpus": 2, "loadavg": [0.1, 0.1, 0.1], "when": "2026-12-07"},
        "scenarios": [
            scenario(
                "latency",
                {"ttft_ms_p50": 2.0, "latency_ms_p50": 0.1, "latency_ms_p99": 0.2,
                 "frames_lost": 0},
                {"ttft_ms_p50": 2.0 + shift, "latency_ms_p50": 0.1 + shift,
                 "latency_ms_p99": 0.2 + shift, "frames_lost": 0},
            ),
            scenario("throughput-16", {"frames_lost": 0},
                     {"cpu_us_per_chunk": 10.0 * shift, "frames_lost": 2}),
            scenario("idle", {}, {"rss_kib_per_stream": 40.0, "frames_lost": 1}),
            sustained,
        ],
    }  # fmt: skip


def test_headlines_are_added_over_the_same_runs_floor() -> None:
    """Latency figures are gateway minus its own direct; CPU and memory its own; losses summed."""
    values = headlines(report(OPENAI.relay_cmd, 1.0))
    assert values["ttft"] == pytest.approx(1.0)
    assert values["chunk_p50"] == pytest.approx(1.0)
    assert values["chunk_p99"] == pytest.approx(1.0)
    assert values["cpu"] == pytest.approx(10.0)
    assert values["rss"] == pytest.approx(40.0)
    assert values["lost"] == 3.0
    assert values["chunk_p99_200"] is None  # no concurrency-200 in this report


def test_sustained_levels_and_labels() -> None:
    """Each mode's level in order; the gateway is named from its command."""
    litellm = report(LITELLM_CMD, 2.0)
    assert sustained_levels(litellm) == {"direct": 512, "relay_w1": 128, "relay_w2": None}
    assert gateway_label(litellm) == "LiteLLM"
    assert gateway_label(report(OPENAI.relay_cmd, 1.0)) == "relay"
    assert mode_label("LiteLLM", "relay_w2") == "LiteLLM w2"
    assert mode_label("relay", "relay") == "relay"
    assert mode_label("relay", "direct") == "direct"


def test_compare_command_prints_both_gateways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench compare reads the JSON reports and prints one column per gateway."""
    paths = []
    for name, command, shift in (("relay", OPENAI.relay_cmd, 1.0), ("lite", LITELLM_CMD, 3.0)):
        path = tmp_path / f"{name}.json"
        path.write_bytes(orjson.dumps(report(command, shift)))
        paths.append(str(path))
    assert main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "LiteLLM" in out
    assert "relay w1" in out
    assert "added time to first token p50 (ms)" in out
    assert "3.00" in out  # LiteLLM's added TTFT


def test_compare_plot_is_written(tmp_path: Path) -> None:
    """--plot writes a PNG with a panel per headline figure (needs matplotlib)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "relay.json"
    path.write_bytes(orjson.dumps(report(OPENAI.relay_cmd, 1.0)))
    plot = tmp_path / "compare.png"
    assert main(["compare", str(path), str(path), "--label", "a", "--label", "b",
                 "--plot", str(plot)]) == 0  # fmt: skip
    assert plot.read_bytes().startswith(b"\x89PNG")
