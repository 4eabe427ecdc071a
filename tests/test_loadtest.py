"""`draftwire loadtest`: its figures from synthetic runs, and a tiny run end to end through the services."""

from __future__ import annotations

import json

import pytest

from services.cli.loadtest import level_summary, percentile
from services.cli.main import main


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_level_summary_counts_tokens_latencies_and_errors():
    runs = [
        {"tokens": 4, "started": 0.0, "finished": 2.0, "chunks": [(0.5, 1), (1.0, 2), (2.0, 1)], "error": None},
        {"tokens": 0, "started": 0.0, "finished": 0.1, "chunks": [], "error": "busy"},
    ]
    row = level_summary(2, 2.0, runs)
    assert row["completed"] == 1 and row["busy"] == 1 and row["errors"] == {"busy": 1}
    assert row["aggregate_tokens_per_s"] == pytest.approx(2.0)
    assert row["ttft_p50_s"] == pytest.approx(0.5)
    # gaps: 0.5 s for 2 tokens (0.25 each), then 1.0 s for 1 token
    assert row["itl_p50_s"] == pytest.approx(0.25) and row["itl_p99_s"] == pytest.approx(1.0)
    assert row["session_tokens_per_s_p50"] == pytest.approx(2.0)


def test_loadtest_end_to_end_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "load"
    rc = main(["loadtest", "--draft-model", "tiny-random", "--draft-dtype", "fp32", "--target-model",
               "tiny-random", "--sessions", "1,3", "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    levels = json.loads((out / "results.json").read_text())["levels"]
    assert [r["sessions"] for r in levels] == [1, 3] and [r["completed"] for r in levels] == [1, 3]
    assert all(r["aggregate_tokens_per_s"] > 0 and r["ttft_p50_s"] is not None for r in levels)
    assert (out / "loadtest.png").stat().st_size > 0
    assert "| 3 | 3 |" in capsys.readouterr().out
