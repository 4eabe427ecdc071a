#!/usr/bin/env bash
# A single session's tokens/s before and after batching, measured in ONE run: the commit before batched
# verification (5612f24, checked out as a git worktree) and this checkout take turns, 3 times each, every turn
# a `draftwire loadtest --sessions 1,1,1,1` (4 requests one after another, greedy, 64 tokens, bench prompt 0,
# SmolLM2 int8 -> fp32, its own fresh stack). Usage, from the repository root with the venv active:
#   bash docs/bench/batching/single_session.sh [OUT_DIR]
set -euo pipefail
out=${1:-bench-out/single-session}
before=5612f24
here=$(pwd)
tree=$(mktemp -d)/before-batching
git worktree add -f "$tree" "$before" -q
trap 'git worktree remove --force "$tree"' EXIT
mkdir -p "$out"
for rep in 1 2 3; do
  for side in before after; do
    dir=$here; [ "$side" = before ] && dir=$tree
    (cd "$dir" && python -m services.cli loadtest --sessions 1,1,1,1 --max-new-tokens 64 \
        --out "$here/$out/$side-$rep" > "$here/$out/$side-$rep.log" 2>&1)
    echo "$side $rep: $(grep -h 'sessions:' "$here/$out/$side-$rep.log" | tr '\n' ' ')"
  done
done
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rates = {side: [lv["aggregate_tokens_per_s"] for rep in (1, 2, 3)
                for lv in json.loads((out / f"{side}-{rep}" / "results.json").read_text())["levels"]]
         for side in ("before", "after")}
summary = {side: {"median_tokens_per_s": statistics.median(v), "runs": v} for side, v in rates.items()}
summary["after_over_before"] = summary["after"]["median_tokens_per_s"] / summary["before"]["median_tokens_per_s"]
(out / "single_session.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: (v if k == "after_over_before" else v["median_tokens_per_s"]) for k, v in summary.items()}))
PY
