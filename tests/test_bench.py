"""`draftwire bench`: its pure parts, and one tiny end-to-end run through real services that writes real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from draftwire.services.cli.bench import (
    PAIRS,
    costs,
    parse_links,
    parse_pairs,
    predicted_speedup,
    summarize,
    table,
)
from draftwire.shared.core.draft_length_policy import expected_tokens
from draftwire.shared.core.link_profile import LinkError, LinkProfile


def test_parse_links() -> None:
    assert [lk.name for lk in parse_links("lan,5g,cell-edge")] == ["lan", "5g", "cell-edge"]
    two = parse_links("cell-edge;up=1M,down=5M,rtt=80ms")
    assert two[1].up_bps == 1e6 and two[1].rtt_s == 0.08
    assert parse_links("cell-edge,rtt=80ms")[0].rtt_s == 0.08  # one spec with an override
    with pytest.raises(LinkError):
        parse_links("lan,moon")


def _stats(**kw) -> dict:
    base = {"new_tokens": 30, "rounds": 10, "drafted": 40, "accepted": 20, "rejections": 8, "mean_gamma": 4.0,
            "uplink_bytes": 4000, "downlink_bytes": 500, "draft_s": 0.8, "verify_s": 0.5, "prefetched": 0}
    return {"stats": {**base, **kw}}


def test_prediction_uses_the_runs_own_costs() -> None:
    agg = summarize([_stats(), _stats()], wall_s=3.0)
    assert agg["tokens_per_s"] == 20.0 and agg["token_acceptance"] == pytest.approx(40 / 56)
    link = LinkProfile("t", up_bps=8e5, down_bps=8e6, rtt_s=0.04)
    c, b = costs(agg, link)
    assert c == pytest.approx(0.02 + 100 * 8 / 8e5)  # draft per token + its uplink bytes at the link rate
    assert b == pytest.approx(0.05 + 0.04 + 50 * 8 / 8e6)  # verify + RTT + downlink per round
    want = expected_tokens(40 / 56, 4.0) * 0.1 / (4 * c + b)
    assert predicted_speedup(agg, link, t_ar=0.1) == pytest.approx(want)
    assert predicted_speedup(summarize([_stats(drafted=0, accepted=0, rejections=0)], 1.0), link, 0.1) is None


def test_table_has_one_row_per_record() -> None:
    rec = {"link": "lan", "mode": "tkslt", "policy": "fixed", "tokens_per_s": 10.0, "speedup_vs_ar": 1.5,
           "predicted_speedup": None, "draft_model": "smollm2-135m:int8"}
    assert table([rec, rec]).count("| lan | tkslt | smollm2-135m:int8 | fixed | 10.00 | 1.50 | - |") == 2


def test_pairs_parse_in_order_and_refuse_unknown_names() -> None:
    assert parse_pairs("qwen, smollm2-qwen,qwen") == ["qwen", "smollm2-qwen"]
    assert PAIRS["smollm2-qwen"][1] == PAIRS["qwen"][1] == PAIRS["gemma3-qwen"][1]  # one target, three drafts
    for bad in ("", "qwen,llama", "smollm2_qwen"):
        with pytest.raises(ValueError, match="unknown pair"):
            parse_pairs(bad)


def test_bench_end_to_end_on_tiny_models(tmp_path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "draftwire.services.cli", "bench", "--draft-model", "tiny-random", "--target-model",
           "tiny-random", "--draft-dtype", "fp32", "--links", "lan;up=1M,down=4M,rtt=30ms", "--modes",
           "ar,tkslt,dssd", "--policies", "fixed,adaptive,pipelined", "--max-prompts", "1", "--max-new-tokens",
           "6", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    served = [r for r in recs if r["link"] != "in-process"]
    assert len(served) == 2 * (1 + 2 * 3)
    for r in served:
        assert r["tokens"] == 6 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert r["speedup_vs_ar"] > 0
        if r["mode"] != "ar":
            assert r["predicted_speedup"] > 0 and r["mean_gamma"] >= 1
            assert r["draft_s_per_drafted"] > 0 and r["verify_s_per_round"] > 0  # the costs behind it
    assert {r["mode"] for r in recs if r["link"] == "in-process"} == {"hf-ar", "hf-assisted"}
    slow = next(r for r in served if r["link"] != "lan" and r["mode"] == "ar")
    fast = next(r for r in served if r["link"] == "lan" and r["mode"] == "ar")
    assert slow["tokens_per_s"] < fast["tokens_per_s"]  # the 30 ms link really slowed every token
    assert (out / "speedup_vs_uplink.png").stat().st_size > 1000
    assert (out / "bytes_per_token.png").stat().st_size > 1000


def test_bench_refuses_bad_flags() -> None:
    for extra in (["--modes", "tkslt,warp"], ["--policies", "magic"], ["--links", "moon"], ["--pair", "qwen,x"]):
        proc = subprocess.run([sys.executable, "-m", "draftwire.services.cli", "bench", *extra], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 2 and "error" in proc.stderr, extra


@pytest.mark.parametrize("args", [[], ["smollm2-135m"]])
def test_int8_measurement_script_refuses_unpaired_arguments(args) -> None:
    script = Path(__file__).resolve().parents[1] / "docs" / "bench" / "int8" / "measure.py"
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "pairs" in proc.stderr
