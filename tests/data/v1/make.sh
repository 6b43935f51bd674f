#!/usr/bin/env bash
# How tests/data/v1/root was made: with the rerankd binary of commit b417605 (the last before the
# renovation), so that tests/compat.rs proves the typed readers of today still read the files the
# code wrote then. Usage: tests/data/v1/make.sh OLD_RERANKD_BINARY (from the repository's root).
# Absolute paths of the repository are replaced by @REPO@, which the test puts back.
set -euo pipefail
BIN=$(realpath "$1")
REPO=$(pwd)
OUT=$REPO/tests/data/v1/root
W=$(mktemp -d)
R=$W/root
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT

# 1. The demo: a completed run, promoted; the demo corpus's feedback and documents.
"$BIN" demo --demo-root "$R" >/dev/null
printf 'max_concurrent_runs = 2\nshutdown_timeout_s = 1\n\n[serve]\nmax_documents = 500\n' >"$R/config.toml"
echo '{"capture": true, "retrain_after_events": 1000000, "min_interval_s": 0, "job": "job.json"}' \
  >"$R/corpora/demo/policy.json"
cp examples/demo/job.json "$R/corpora/demo/job.json"

# 2. A run of the demo corpus paused with a checkpoint, and a run of corpus `b` that a daemon
#    shutting down had to kill (left queued with its cancel file saying "daemon shutdown").
mkdir -p "$R/corpora/b"
python3 - "$R" "$REPO" <<'PY'
import json, sys
root, repo = sys.argv[1], sys.argv[2]
job = json.load(open(f"{repo}/examples/demo/job.json"))
job["model"] = f"{repo}/tests/fixtures/tiny-qwen3"
job["train"]["epochs"] = 2
job["train"]["checkpoint_every_s"] = 0
json.dump(job, open(f"{root}/spool/tmp/paused.json", "w"))
job2 = dict(job, corpus="b")
json.dump(job2, open(f"{root}/spool/tmp/b.json", "w"))
PY
cp "$R/corpora/demo/feedback.jsonl" "$R/corpora/demo/documents.jsonl" "$R/corpora/b/"
mv "$R/spool/tmp/paused.json" "$R/spool/paused.json"
mv "$R/spool/tmp/b.json" "$R/spool/b.json"
RERANKD_TEST_STEP_SLEEP_MS=1500 "$BIN" --root "$R" daemon 2>"$W/daemon.log" &
D=$!
wait_for() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; echo "timed out: $1" >&2; exit 1; }
wait_for '[ -f "$R/spool/accepted/paused.json" ] && [ -f "$R/spool/accepted/b.json" ]'
P=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$R/spool/accepted/paused.json")
B=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$R/spool/accepted/b.json")
wait_for 'grep -q "\"type\":\"checkpoint\"" "$R/runs/$P/metrics.jsonl" 2>/dev/null && grep -q "\"type\":\"checkpoint\"" "$R/runs/$B/metrics.jsonl" 2>/dev/null'
"$BIN" --root "$R" pause "$P" --wait 60 >/dev/null
kill -TERM $D; wait $D || true

# 3. Strip what a test does not need and make the paths relative to the repository.
rm -f "$R/daemon.lock" "$R"/runs/*/report.svg
find "$R" -name '*.tmp.*' -exec rm -rf {} +
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"; cp -a "$R" "$OUT"
grep -rlI --null "$REPO" "$OUT" | xargs -0 -r sed -i "s|$REPO|@REPO@|g"
echo "made $OUT: paused $P, interrupted $B"
