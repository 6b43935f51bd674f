#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one go: the `cuda` build, the fixture tests on the GPU (same
# tolerances as on the CPU), and `rerankd bench` beside the PyTorch peer on the same card at
# 1x256 / 8x256 / 1x1024 (training) and 8x256 / 1x1024 (scoring), alternating, with the card's name.
# Every line it prints is JSON or a table row; paste the table into docs/performance.md (GPU).
#
#   benches/gpu.sh [ROUNDS]        PEER_PY=python with torch+transformers+peft (skipped if absent)
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
card=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
echo "{\"card\":\"$card\"}"
cargo build --release --features cuda 2>&1 | tail -1
RERANKD_TEST_DEVICE=cuda cargo test --release --features cuda --test fixture 2>&1 | grep -E "^test |test result"
py=${PEER_PY:-python3}
have_peer=1
"$py" -c "import torch, transformers, peft; assert torch.cuda.is_available()" 2>/dev/null || {
  have_peer=0; echo '{"peer":"skipped: no python with CUDA torch, transformers and peft (set PEER_PY)"}'; }
out=$(mktemp)
for ((r = 1; r <= rounds; r++)); do
  for s in train:1x256 train:8x256 train:1x1024 score:8x256 score:1x1024; do
    mode=${s%%:*}; bl=${s#*:}; b=${bl%x*}; l=${bl#*x}
    ours=$(target/release/rerankd bench --device cuda --config tests/fixtures/qwen3-0.6b.config.json \
      --batch "$b" --length "$l" --steps 5 --only "$mode" --json)
    echo "{\"tool\":\"rerankd\",\"shape\":\"$s\",\"out\":$ours}" | tee -a "$out"
    if [ $have_peer = 1 ]; then
      flag=""; [ "$mode" = score ] && flag="--score"
      peer=$("$py" benches/peer/peer_torch_lora.py --device cuda $flag --batch "$b" --seq "$l" --steps 5 2>/dev/null | tail -1)
      echo "{\"tool\":\"torch\",\"shape\":\"$s\",\"out\":$peer}" | tee -a "$out"
    fi
  done
done
python3 - "$out" "$card" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def sec(r):
    o = r["out"]
    if r["tool"] == "rerankd":
        return (o["step_ms_median"] if r["shape"].startswith("train") else o["score_ms_median"]) / 1e3
    return o.get("step_s_median", o.get("batch_s_median"))
print(f"\n| shape ({sys.argv[2]}) | rerankd s | torch s | time ratio |")
print("|---|---|---|---|")
for s in dict.fromkeys(r["shape"] for r in rows):
    ours = statistics.median(sec(r) for r in rows if r["shape"] == s and r["tool"] == "rerankd")
    peer = [sec(r) for r in rows if r["shape"] == s and r["tool"] == "torch"]
    p = statistics.median(peer) if peer else None
    print(f"| {s} | {ours:.3f} | {p if p is None else f'{p:.3f}'} | {'' if p is None else f'{ours/p:.2f}'} |")
PY
rm -f "$out"
