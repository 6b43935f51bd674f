#!/bin/sh
# Drops a job into a rerankd spool the safe way and waits for its run to end.
# Usage: submit_and_wait.sh ROOT JOB.json   -> prints the run id; exits 0 completed, 1 failed or
# rejected, 5 cancelled, 2 on a timeout (RERANKD_WAIT_S, default 600 seconds).
set -eu
root=$1
job=$2
name="$(basename "$job" .json)-$(date +%s)-$$.json"
wait_s=${RERANKD_WAIT_S:-600}

cp "$job" "$root/spool/tmp/$name"
mv "$root/spool/tmp/$name" "$root/spool/$name"

# Waits until file $1 exists (or until $2 exists, for the rejection), up to the deadline.
deadline=$(( $(date +%s) + wait_s ))
wait_for() {
  while [ ! -e "$1" ] && [ ! -e "${2:-/nonexistent}" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $1" >&2; exit 2; }
    if command -v inotifywait >/dev/null 2>&1; then
      inotifywait -qq -t 1 -e create -e moved_to "$(dirname "$1")" 2>/dev/null || true
    else
      sleep 0.2
    fi
  done
}

wait_for "$root/spool/accepted/$name" "$root/spool/rejected/$name"
if [ -e "$root/spool/rejected/$name" ]; then
  sleep 0.2  # the reason is written first; give a slow disk a moment
  echo "rejected: $(cat "$root/spool/rejected/${name%.json}.error.json" 2>/dev/null)" >&2
  exit 1
fi
run=$(sed -n 's/.*"run_id": *"\([^"]*\)".*/\1/p' "$root/spool/accepted/$name" | head -n 1)
echo "$run"

status="$root/runs/$run/status.json"
while :; do
  state=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' "$status" 2>/dev/null | head -n 1)
  case "$state" in
    completed) exit 0 ;;
    failed) exit 1 ;;
    cancelled) exit 5 ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $run" >&2; exit 2; }
  sleep 0.5
done
