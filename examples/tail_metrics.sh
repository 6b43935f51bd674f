#!/bin/sh
# Follows a run's metrics.jsonl with tail -F and jq, one short line per event that matters, and
# ends when the run reaches a terminal state.
# Usage: tail_metrics.sh ROOT RUN_ID
set -eu
log="$1/runs/$2/metrics.jsonl"
fifo=$(mktemp -u)
mkfifo "$fifo"
tail -n +1 -F "$log" > "$fifo" 2>/dev/null &
tpid=$!
trap 'kill "$tpid" 2>/dev/null || true; rm -f "$fifo"' EXIT INT TERM
jq --unbuffered -r '
  if .type == "step" then "step \(.step) epoch \(.epoch) loss \(.loss) lr \(.lr)"
  elif .type == "eval" then "eval \(.which) \(.metrics | tostring)"
  elif .type == "state" then "state \(.state)\(if .reason then " (" + .reason + ")" else "" end)"
  else empty end' < "$fifo" | while IFS= read -r line; do
  echo "$line"
  case "$line" in
    "state completed"* | "state failed"* | "state cancelled"*) kill "$tpid" 2>/dev/null || true; break ;;
  esac
done
