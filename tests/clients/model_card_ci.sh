#!/usr/bin/env bash
# Runs an export's model card recipes (transformers, sentence-transformers) as written, on f32
# seq-cls and merged exports of the fixture model, and checks that they reproduce `rerankd score
# --model DIR` within 1e-5 on documents longer than max_length. Run by .ci/run after the build.
# Installs what it needs once into a venv ($CARD_ENV, default ~/.cache/rerankd-card-env); a
# machine that cannot install them reports the check as skipped (to $RERANKD_SKIPPED), never as
# passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$PWD/target/release/rerankd
ENVDIR=${CARD_ENV:-$HOME/.cache/rerankd-card-env}
skip() {
  echo "model card recipes: SKIPPED: $1"
  if [ -n "${RERANKD_SKIPPED:-}" ]; then echo "model card recipes: $1" >>"$RERANKD_SKIPPED"; fi
  exit 0
}
if [ ! -x "$ENVDIR/bin/python" ] || ! "$ENVDIR/bin/python" -c "import torch, transformers, sentence_transformers" 2>/dev/null; then
  python3 -m venv "$ENVDIR" >/dev/null 2>&1 || skip "python3 cannot make a venv"
  "$ENVDIR/bin/pip" install -q torch transformers sentence-transformers >"$ENVDIR.install.log" 2>&1 ||
    skip "pip could not install torch, transformers and sentence-transformers (see $ENVDIR.install.log)"
fi
py=$ENVDIR/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run=docs__20261127_120000
adapter=$tmp/root/models/docs/adapters/$run
mkdir -p "$adapter"
cp tests/fixtures/tiny-qwen3/peft_adapter/adapter_config.json tests/fixtures/tiny-qwen3/peft_adapter/adapter_model.safetensors "$adapter/"
printf '{"model": "%s", "corpus": "docs", "run_id": "%s", "max_length": 100, "instruction": "Given a question, find the passage that answers it"}' \
  "$PWD/tests/fixtures/tiny-qwen3" "$run" >"$adapter/manifest.json"
ln -s "adapters/$run" "$tmp/root/models/docs/current"
query="what is rust"
long=$(printf 'The borrow checker enforces ownership at compile time. %.0s' $(seq 40))
docs=("Rust is a systems programming language." "Bananas are yellow." "$long")
for format in seq-cls merged; do
  out=$tmp/$format
  RERANKD_KERNEL=f32 "$BIN" --root "$tmp/root" export --corpus docs --format "$format" --dtype f32 --out "$out" >/dev/null
  args=()
  for d in "${docs[@]}"; do args+=(--doc "$d"); done
  RERANKD_KERNEL=f32 "$BIN" score --model "$out" --device cpu --json --query "$query" "${args[@]}" 2>/dev/null >"$tmp/want.jsonl"
  "$py" tests/clients/model_card_check.py "$out" "$query" "${docs[@]}" 2>/dev/null | grep '^{' >"$tmp/got.jsonl"
  "$py" - "$tmp/want.jsonl" "$tmp/got.jsonl" "$format" <<'PY'
import json, sys
want = [json.loads(l)["score"] for l in open(sys.argv[1]) if l.startswith("{")]
recipes = [json.loads(l) for l in open(sys.argv[2])]
assert want and recipes, "no scores"
for r in recipes:
    assert "scores" in r, f"recipe {r['recipe']} of {sys.argv[3]} did not run: {r}"
    diff = max(abs(a - b) for a, b in zip(r["scores"], want))
    assert len(r["scores"]) == len(want) and diff <= 1e-5, f"{sys.argv[3]} recipe {r['recipe']}: {r['scores']} vs {want}"
    print(f"model card recipes: {sys.argv[3]} recipe {r['recipe']} equals rerankd score within {diff:.1e} "
          f"({len(want)} documents, one cut to max_length)")
PY
done
