"""The benchmark results the README shows and cites are in the repository."""

from __future__ import annotations

import pathlib
import re

import orjson

ROOT = pathlib.Path(__file__).parents[2]


def _cited() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"bench/results/[\w.-]+", readme))
    # "`bench/results/a.json` and `b.json`": the second name is in the same folder
    paths |= {f"bench/results/{name}" for name in re.findall(r"`([\w-]+\.json)`", readme)}
    return paths


def test_every_result_the_readme_cites_exists() -> None:
    """A clean clone has them all (a plot once went missing behind ``*.png`` in .gitignore)."""
    cited = _cited()
    assert "bench/results/stream-50x.png" in cited
    missing = sorted(path for path in cited if not (ROOT / path).is_file())
    assert missing == []


def _holds_a_bench_report(value: object) -> bool:
    """True if ``value`` is, or holds at any depth, a ``bench overhead`` report."""
    if isinstance(value, dict):
        return "scenarios" in value or any(_holds_a_bench_report(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_a_bench_report(v) for v in value)
    return False


def test_the_cited_reports_are_bench_reports() -> None:
    """Every cited JSON file is a bench report, or an A/B file made of them."""
    for path in sorted(_cited()):
        if path.endswith(".json"):
            report = orjson.loads((ROOT / path).read_bytes())
            assert isinstance(report, dict), path
            assert _holds_a_bench_report(report), path


def test_a_file_without_a_report_is_not_taken_for_one() -> None:
    """The check looks for the report's own key, not any JSON object."""
    assert not _holds_a_bench_report({"what": "notes", "runs": [{"figure": 1.0}]})
    assert _holds_a_bench_report({"what": "A/B", "rounds": [{"current": {"scenarios": []}}]})
