"""``bench overhead --gateway NAME=CMD``: other gateways measured beside the relay in one run.

The tiny run starts the StepChat emulator, our relay and two more copies of
our relay's command under the names ``a`` and ``b`` (without ``{workers}``,
so each is one sustained variant) on loopback: 5 frames, 1 stream, two
repeats of ``latency`` and ``sustained``. The tests assert structure, frame
accounting and the order of the turns, never a timing. Merging is checked
on synthetic results too, against one result of all the repeats.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import trio

from bench import litellm
from bench.__main__ import build_parser, main, overhead_clean
from bench.compare import gateway_reports, headlines, unique_labels
from bench.measure import combine_runs
from bench.overhead import (
    Gateway,
    OverheadOptions,
    ScenarioResult,
    finish_result,
    finish_sustained,
    merge_results,
    parse_gateway,
    run_overhead,
)
from bench.scenarios import scenarios
from bench.stats import median_or_none
from bench.upstreams import STEP
from protocol.errors import RequestError

if TYPE_CHECKING:
    from pathlib import Path

#: Our relay's command with one worker: a second and third gateway, one sustained variant each.
TWIN_CMD = STEP.relay_cmd.replace("{workers}", "1")
TINY = ["--quick", "--frames", "5", "--streams", "1", "--idle-streams", "2",
        "--first-delay", "0.05", "--settle", "0.02", "--no-progress"]  # fmt: skip
NAMES = ["relay", "a", "b"]
#: The turns of each repeat: the line-up rotated left by the repeat number.
ROTATION = [["relay", "a", "b"], ["a", "b", "relay"]]


class Recorder:
    """A :class:`bench.progress.Progress` that keeps every run's description, in order."""

    def __init__(self) -> None:
        self.begun: list[str] = []

    def begin(self, description: str, total: int) -> None:
        """Keep the description."""
        self.begun.append(description)

    def advance(self) -> None:
        """Ignore."""

    def end(self) -> None:
        """Ignore."""


@pytest.fixture(scope="module")
def beside(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str], Path]:
    """One tiny run of the relay beside gateways a and b: the report (through JSON),
    the progress descriptions in order, and the log directory."""
    logs = tmp_path_factory.mktemp("gateways")
    options = OverheadOptions(
        scenario="latency,sustained",
        repeats=2,
        quick=True,
        frames=5,
        streams=1,
        first_delay_s=0.05,
        settle_s=0.02,
        log_dir=str(logs),
        gateways=(Gateway("a", TWIN_CMD), Gateway("b", TWIN_CMD)),
    )
    recorder = Recorder()
    report = trio.run(run_overhead, options, recorder)
    return orjson.loads(orjson.dumps(report)), recorder.begun, logs


def every_result(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each gateway's scenario results by name, the relay's (the top level) as ``relay``."""
    results = {"relay": report["scenarios"]}
    results.update({g["name"]: g["scenarios"] for g in report["gateways"]})
    return results


def test_the_report_is_the_relays_with_each_gateway_beside_it(
    beside: tuple[dict[str, Any], list[str], Path],
) -> None:
    """The top level is the relay's run; gateways a and b each have every scenario,
    each scenario its two repeats of runs and of direct runs, nothing lost or failed."""
    report, _, _ = beside
    assert report["relay_cmd"] == STEP.relay_cmd
    assert [(g["name"], g["relay_cmd"]) for g in report["gateways"]] == [
        ("a", TWIN_CMD), ("b", TWIN_CMD)
    ]  # fmt: skip
    assert report["options"]["gateways"] == [
        {"name": "a", "relay_cmd": TWIN_CMD}, {"name": "b", "relay_cmd": TWIN_CMD}
    ]  # fmt: skip
    for name, results in every_result(report).items():
        assert [s["key"] for s in results] == ["latency", "sustained"], name
        for result in results:
            assert result["failure"] is None, (name, result["failure"])
            assert result["repeats"] == 2
            assert len(result["direct_runs"]) == len(result["relay_runs"]) == 2
            assert result["direct_errors"] == result["relay_errors"] == {}
        latency = results[0]
        for runs in (latency["direct_runs"], latency["relay_runs"]):
            assert [run["frames_received"] for run in runs] == [5.0, 5.0]
        assert latency["relay"]["frames_lost"] == latency["direct"]["frames_lost"] == 0
    assert overhead_clean(report)


def test_turns_rotate_with_the_repeat(beside: tuple[dict[str, Any], list[str], Path]) -> None:
    """Repeat 0 runs relay, a, b; repeat 1 runs a, b, relay: the report's ``order`` says so,
    the progress shows each turn's direct run right before its own, and each turn
    logged to its own directory."""
    report, begun, logs = beside
    assert report["order"] == {"latency": ROTATION, "sustained": ROTATION}
    latency = [d for d in begun if d.startswith("latency ")]
    expected = []
    for repeat, turns in enumerate(ROTATION, start=1):
        for name in turns:
            if name == "relay":
                expected += [f"latency direct {repeat}/2", f"latency relay {repeat}/2"]
            else:
                expected += [f"latency direct ({name}) {repeat}/2", f"latency {name} {repeat}/2"]
    assert latency == expected
    for name in NAMES:
        for turn in ("1", "2"):
            assert (logs / name / turn / "latency-relay-1.log").exists(), (name, turn)


def test_merged_figures_are_those_of_the_runs(
    beside: tuple[dict[str, Any], list[str], Path],
) -> None:
    """Every gateway's figures are combine_runs of its own runs, direct of its own direct runs;
    sustained levels are the medians of its own searches."""
    report, _, _ = beside
    for name, (latency, sustained) in every_result(report).items():
        assert latency["relay"] == combine_runs(latency["relay_runs"]), name
        assert latency["direct"] == combine_runs(latency["direct_runs"]), name
        assert [v["figure"] for v in latency["verdicts"]] == [
            "ttft_ms_p50", "latency_ms_p50", "latency_ms_p99"
        ]  # fmt: skip
        modes = sustained["sustained"]["modes"]
        for mode in modes.values():
            assert len(mode["runs"]) == 2
            assert mode["sustained"] == median_or_none([run["sustained"] for run in mode["runs"]])
        assert sustained["direct"] == {"sustained_streams": modes["direct"]["sustained"]}
    relay_modes = report["scenarios"][1]["sustained"]["modes"]
    assert {k: m["label"] for k, m in relay_modes.items()} == {
        "direct": "direct", "relay_w1": "relay --workers 1", "relay_w2": "relay --workers 2"
    }  # fmt: skip
    a_modes = report["gateways"][0]["scenarios"][1]["sustained"]["modes"]
    assert {k: m["label"] for k, m in a_modes.items()} == {"direct": "direct", "relay": "a"}


def test_compare_splits_the_report_into_its_gateways(
    beside: tuple[dict[str, Any], list[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench compare reads one report of a run with gateways as relay, a and b."""
    report, _, _ = beside
    pairs = gateway_reports(report)
    assert [label for label, _ in pairs] == NAMES
    for (label, plain), results in zip(pairs, every_result(report).values(), strict=True):
        assert "gateways" not in plain
        assert "order" not in plain
        assert plain["scenarios"] == results
        assert plain["machine"] == report["machine"]
        assert headlines(plain)["lost"] == 0.0, label
    assert pairs[1][1]["relay_cmd"] == TWIN_CMD
    path = tmp_path / "gateways.json"
    path.write_bytes(orjson.dumps(report))
    assert main(["compare", str(path)]) == 0
    table = capsys.readouterr().out
    assert "relay w2" in table
    assert "direct (b run)" in table
    assert main(["compare", str(path), "--label", "ours"]) == 0
    assert "ours w1" in capsys.readouterr().out
    assert main(["compare", str(path), *["--label", "x"] * 4]) == 2
    assert "more --label" in capsys.readouterr().err


def test_compare_plot_from_one_report(
    beside: tuple[dict[str, Any], list[str], Path], tmp_path: Path
) -> None:
    """--plot draws the gateways of one report (needs matplotlib)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "gateways.json"
    path.write_bytes(orjson.dumps(beside[0]))
    plot = tmp_path / "gateways.png"
    assert main(["compare", str(path), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_text_report_shows_each_gateway_and_the_comparison(
    beside: tuple[dict[str, Any], list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """print_overhead_report: the relay's tables, a heading per gateway, then the comparison."""
    from bench import report as out

    out.print_overhead_report(beside[0], out.console())
    text = capsys.readouterr().out
    first_a, first_b = text.index("gateway a,"), text.index("gateway b,")
    comparison = text.index("lower is better")
    assert text.index("targets: ") < first_a < first_b < comparison
    assert "targets (a): " in text
    assert "latency: relay, a, b | a, b, relay" in text


def test_a_gateway_that_fails_sits_out_later_repeats(tmp_path: Path) -> None:
    """A gateway whose command exits fails its scenario and skips the next repeat's turn;
    the relay's runs are unaffected; the exit status is 1."""
    out = tmp_path / "report.json"
    broken = "broken={python} -c 'raise SystemExit(3)'"
    status = main(["overhead", *TINY, "--repeats", "2", "--scenario", "latency",
                   "--gateway", broken, "--json", str(out)])  # fmt: skip
    report = orjson.loads(out.read_bytes())
    assert status == 1
    assert report["order"] == {"latency": [["relay", "broken"], ["relay"]]}
    (relay,) = report["scenarios"]
    assert relay["failure"] is None
    assert relay["repeats"] == 2
    (failed,) = report["gateways"][0]["scenarios"]
    assert failed["repeats"] == 0
    assert "exited with status 3" in failed["failure"]
    assert len(failed["direct_runs"]) == 0  # the gateway failed at start, before its floor ran


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["no-equals-sign"], "expected NAME=CMD"),
        (["=cmd"], "use letters, digits"),
        (["a="], "expected NAME=CMD"),
        (["a b=cmd"], "use letters, digits"),
        (["../up=cmd"], "use letters, digits"),
        (["relay=cmd"], "'relay' is taken"),
        (["Direct=cmd"], "'Direct' is taken"),
        (["a={python} {nope}"], "--gateway a: relay command: bad placeholder 'nope'"),
        (["a=cmd", "A=other"], "'A' is given twice"),
    ],
)
def test_bad_gateways_are_refused(
    values: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --gateway without NAME=CMD, with a bad, reserved or repeated name, or an unknown
    placeholder exits 2 with a message, before any process starts."""
    argv = ["overhead", "--no-progress"]
    for value in values:
        argv += ["--gateway", value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_litellm_gateway_value_splits_at_the_first_equals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--gateway litellm="$(python -m bench.litellm relay-cmd)" and the helper's own
    ``gateway`` command both give LiteLLM's command whole, '=' signs and all."""
    args = build_parser().parse_args(["overhead", "--gateway", f"litellm={litellm.RELAY_CMD}"])
    assert parse_gateway(args.gateway[0]) == Gateway("litellm", litellm.RELAY_CMD)
    assert litellm.main(["gateway"]) == 0
    printed = capsys.readouterr().out.strip()
    assert parse_gateway(printed) == Gateway("litellm", litellm.RELAY_CMD)
    assert parse_gateway("x=env A=1 B==2 run") == Gateway("x", "env A=1 B==2 run")
    with pytest.raises(RequestError, match="taken"):
        parse_gateway("relay=" + litellm.RELAY_CMD)


def test_unique_labels_number_repeats() -> None:
    """Repeated labels are numbered from their second use, never colliding with a given one."""
    assert unique_labels(["relay", "a", "relay", "relay"]) == [
        "relay", "a", "relay (2)", "relay (3)"
    ]  # fmt: skip
    assert unique_labels(["a", "a (2)", "a"]) == ["a", "a (2)", "a (3)"]


# --- merging, on synthetic results ---------------------------------------------------


def latency_runs(count: int) -> list[tuple[dict[str, float | None], dict[str, float | None]]]:
    """``count`` (direct, relay) run figures of the latency scenario, each a little different."""
    runs = []
    for index in range(count):
        direct: dict[str, float | None] = {
            "ttft_ms_p50": 2.0 + index, "latency_ms_p50": 0.1 * (3 - index),
            "latency_ms_p99": 0.3, "frames_expected": 5.0, "frames_received": 5.0,
            "frames_lost": 0.0, "streams_ok": 1.0,
        }  # fmt: skip
        relay = {**direct, "ttft_ms_p50": 3.0 + 2 * index, "frames_lost": float(index == 1),
                 "latency_ms_p99": None if index == 2 else 0.5}  # fmt: skip
        runs.append((direct, relay))
    return runs


def test_merging_one_repeat_results_gives_one_run_of_all_repeats() -> None:
    """Three one-repeat latency results merge into what one three-repeat result is:
    runs in order, errors added, the first three samples, medians and verdicts again."""
    latency = next(s for s in scenarios(quick=True, frames=5, streams=1) if s.key == "latency")
    runs = latency_runs(3)
    errors = [{"timeout": 1}, {}, {"timeout": 2, "http_502": 1}]
    samples = [["relay: a", "relay: b"], [], ["relay: c", "relay: d"]]
    parts = []
    for (direct, relay), error, sample in zip(runs, errors, samples, strict=True):
        part = ScenarioResult(latency.key, latency.label, asdict(latency.params), latency.streams,
                              repeats=1, direct_runs=[direct], relay_runs=[relay],
                              relay_errors=error, error_samples=sample)  # fmt: skip
        parts.append(finish_result(part, latency))
    whole = ScenarioResult(latency.key, latency.label, asdict(latency.params), latency.streams,
                           repeats=3, direct_runs=[d for d, _ in runs],
                           relay_runs=[r for _, r in runs],
                           relay_errors={"timeout": 3, "http_502": 1},
                           error_samples=["relay: a", "relay: b", "relay: c"])  # fmt: skip
    merged = merge_results(latency, parts)
    assert asdict(merged) == asdict(finish_result(whole, latency))
    assert merged.relay["frames_lost"] == 1.0
    assert merged.relay["ttft_ms_p50"] == 5.0
    assert len(merged.verdicts) == 3


def test_merging_keeps_a_failure_that_ended_the_repeats() -> None:
    """A last part with no repeat done (its relay failed) gives the merged failure;
    its partial runs stay, as in one run that stopped there."""
    latency = next(s for s in scenarios(quick=True, frames=5, streams=1) if s.key == "latency")
    (direct, relay), (direct2, _) = latency_runs(2)
    done = ScenarioResult(latency.key, latency.label, asdict(latency.params), latency.streams,
                          repeats=1, direct_runs=[direct], relay_runs=[relay])  # fmt: skip
    cut = ScenarioResult(latency.key, latency.label, asdict(latency.params), latency.streams,
                         direct_runs=[direct2], failure="relay exited with status 1")  # fmt: skip
    merged = merge_results(latency, [finish_result(done, latency), finish_result(cut, latency)])
    assert merged.repeats == 1
    assert merged.failure == "relay exited with status 1"
    assert merged.direct_runs == [direct, direct2]
    assert merged.direct == combine_runs([direct, direct2])


def test_merging_sustained_searches_gives_one_run_of_all_repeats() -> None:
    """Sustained: two one-repeat searches merge into the levels, figures and verdicts
    of one two-repeat search; searches cut short are joined into the failure."""
    sustained = next(s for s in scenarios(quick=True, streams=4) if s.key == "sustained")
    labels = {"direct": "direct", "relay_w1": "g --workers 1", "relay_w2": "g --workers 2"}

    def run(level: int | None) -> dict[str, Any]:
        return {"sustained": level, "capped": False, "failed_level": None, "reason": "",
                "aborted": level is None, "levels": []}  # fmt: skip

    repeats = [
        {"direct": run(4), "relay_w1": run(2), "relay_w2": run(None)},
        {"direct": run(2), "relay_w1": run(1), "relay_w2": run(4)},
    ]
    failures = ["g --workers 2 at 1 streams: did not start", None]
    parts = []
    for got, failure in zip(repeats, failures, strict=True):
        part = ScenarioResult(sustained.key, sustained.label, asdict(sustained.params),
                              sustained.streams, repeats=1, failure=failure)  # fmt: skip
        parts.append(finish_sustained(part, sustained, labels, {k: [v] for k, v in got.items()}))
    whole = ScenarioResult(sustained.key, sustained.label, asdict(sustained.params),
                           sustained.streams, repeats=2, failure=failures[0])  # fmt: skip
    every = {key: [got[key] for got in repeats] for key in labels}
    merged = merge_results(sustained, parts)
    assert asdict(merged) == asdict(finish_sustained(whole, sustained, labels, every))
    assert merged.relay == {"sustained_streams": 1.5, "sustained_streams_w2": 4}
    assert [v["result"] for v in merged.verdicts] == ["PASS", "PASS"]
