"""The chaos suite (`draftwire faults` with NATS-node and leaf-link faults): its accounting of what each kind
of fault cost, its refusals of passes the stack cannot run, and (slow) a whole chaos pass on tiny-random."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from draftwire.services.cli.faults import Outcome, Phase, summarize
from draftwire.services.cli.main import build_parser


def _outcome(prompt: int, started: float, latency: float) -> Outcome:
    return Outcome(prompt=prompt, started=started, finished=started + latency, replies=1, token_ids=[prompt])


def test_each_kind_of_fault_is_charged_only_the_latency_it_added_to_a_prompt_it_alone_struck():
    reference = Phase("none", outcomes=[_outcome(i, 0.0, 1.0) for i in range(4)])
    chaos = Phase("chaos", outcomes=[_outcome(0, 10.0, 2.5), _outcome(1, 20.0, 6.0), _outcome(2, 30.0, 3.0),
                                     _outcome(3, 40.0, 1.0)])
    chaos.kills = [(11.0, "verifier-2", [0]), (21.0, "leaf", [1]), (30.5, "nats-1", [2]), (31.0, "nats-2", [2]),
                   (45.0, "scheduler", [])]
    row = summarize(chaos, reference)
    assert row["completed"] == row["identical"] == 4 and row["duplicate_replies"] == 0
    assert row["by_fault"] == {
        "verifier": {"faults": 1, "striking_one_prompt_once": 1, "median_added_s": 1.5, "max_added_s": 1.5},
        "leaf": {"faults": 1, "striking_one_prompt_once": 1, "median_added_s": 5.0, "max_added_s": 5.0},
        # prompt 2 met both node kills: neither is charged with it
        "nats": {"faults": 2, "striking_one_prompt_once": 0, "median_added_s": None, "max_added_s": None},
        "scheduler": {"faults": 1, "striking_one_prompt_once": 0, "median_added_s": None, "max_added_s": None},
    }
    assert row["kills_of_an_idle_replica"] == 1 and sorted(row["added_s_per_kill"]) == [1.5, 5.0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--phases", "nats"], "needs --nats-cluster 3"),
    (["--phases", "nats", "--nats-cluster", "2"], "needs --nats-cluster 3"),
    (["--phases", "chaos", "--nats-cluster", "3"], "needs --leaf"),
    (["--phases", "chaos", "--chaos-order", "verifier,nats", "--leaf"], "needs --nats-cluster 3"),
    (["--phases", "chaos", "--chaos-order", "verifier,disk"], "unknown fault 'disk'"),
    (["--phases", "gpu"], "unknown phase 'gpu'"),
    (["--phases", "leaf", "--leaf", "--outage", "400", "--timeout", "300"], "shorter than each request"),
])
def test_a_pass_the_stack_cannot_run_is_refused_before_anything_starts(flags, message, capsys):
    args = build_parser().parse_args(["faults", *flags])
    with pytest.raises(SystemExit, match=message):
        args.func(args)


@pytest.mark.slow
def test_a_chaos_pass_on_a_3_node_cluster_with_drafts_on_a_leaf_loses_nothing(tmp_path):
    """Every fault kind strikes at least once; every prompt completes, identical, answered once (~2 min)."""
    out = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "draftwire.services.cli", "faults", "--draft-model", "tiny-random", "--draft-dtype",
         "fp32", "--target-model", "tiny-random", "--target-dtype", "fp32", "--nats-cluster", "3", "--leaf",
         "--phases", "chaos", "--num-prompts", "300", "--kill-every", "2", "--concurrency", "2",
         "--outage", "3", "--out", str(out)], check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["leaf_connections_cut"] >= record["phases"][1]["by_fault"]["leaf"]["faults"]  # outages landed
    chaos = record["phases"][1]
    assert chaos["completed"] == chaos["identical"] == 300 and chaos["duplicate_replies"] == 0
    assert set(chaos["by_fault"]) == {"verifier", "draft", "scheduler", "nats", "leaf"}, chaos["by_fault"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--nats-cluster", "3", "--nats", "nats://127.0.0.1:1"], "leave out --nats"),
    (["--nats-cluster", "3", "--link", "cell-edge"], "add --leaf"),
    (["--nats", "nats://127.0.0.1:1,nats://127.0.0.1:2", "--link", "lan"], "add --leaf"),
    (["--leaf", "--nats", "nats://127.0.0.1:1"], "leave out --nats and --secure"),
    (["--leaf", "--secure", "/nonexistent-dir"], "leave out --nats and --secure"),
])
def test_up_refuses_a_site_layout_it_cannot_run_with_a_clear_error(flags, message, capsys):
    from draftwire.services.cli.main import main

    assert main(["up", "--draft-model", "tiny-random", "--target-model", "tiny-random", *flags]) != 0
    assert message in capsys.readouterr().err
