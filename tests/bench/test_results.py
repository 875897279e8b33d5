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


def test_the_cited_reports_are_bench_reports() -> None:
    for path in sorted(_cited()):
        if path.endswith(".json"):
            report = orjson.loads((ROOT / path).read_bytes())
            assert isinstance(report, dict)
            assert "scenarios" in report or "round2" in report or "runs" in report, path
