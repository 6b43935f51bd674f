#!/usr/bin/env bash
# rerankd bench beside the PyTorch peer (transformers + peft, benches/peer: a copy of ../shared/bench), alternating the two
# tools shape by shape, round by round, on one machine in one run; prints every JSON line, then a
# table of medians and ratios. Random weights of the Qwen3-0.6B shape, LoRA r16 on q/k/v/o, f32.
#
#   benches/side_by_side.sh [ROUNDS] [SHAPE...]
#   SHAPE: train:BxL, score:BxL, or docs:NxL (one query of 16 tokens with N documents of L tokens:
#   rerankd with the shared prompt prefix computed once, the peer scoring the N whole prompts of
#   60 + 16 + L tokens in one batch). Default: all of the issue's shapes.
#   PEER_PY=/path/to/python (default: the venv ../shared/bench/setup_peer.sh makes)
#   RERANKD=target/release/rerankd   CONFIG=tests/fixtures/qwen3-0.6b.config.json   STEPS=3
#   KERNELS="auto avx512 f32": rerankd runs once per CPU kernel path (RERANKD_KERNEL, see
#   src/model/cpu.rs) in each round: "rerankd" as it runs by default (auto: the best path this CPU
#   has), "rerankd-<path>" for a named one; the table compares each with the peer. Default: auto.
#   PRECISION=bf16: scoring shapes in reduced precision on both sides (rerankd --precision bf16,
#   the peer under torch.autocast(bfloat16)); training shapes are refused then.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1}; shift || true
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(train:1x256 train:4x256 train:1x1024 train:1x2048 score:8x256 score:1x1024 docs:20x200)
peer_dir=${PEER_DIR:-benches/peer}
py=${PEER_PY:-$(benches/peer/setup_peer.sh)}
bin=${RERANKD:-target/release/rerankd}
config=${CONFIG:-tests/fixtures/qwen3-0.6b.config.json}
steps=${STEPS:-3}
read -r -a kernels <<< "${KERNELS:-auto}"
precision=${PRECISION:-f32}
peer_precision=""; [ "$precision" = bf16 ] && peer_precision="--bf16"
threads=${THREADS:-$(nproc)}
[ -x "$bin" ] || cargo build --release
out=$(mktemp)
for ((r = 1; r <= rounds; r++)); do
  for s in "${shapes[@]}"; do
    mode=${s%%:*}; bl=${s#*:}; b=${bl%x*}; l=${bl#*x}
    for kernel in "${kernels[@]}"; do
      tool=rerankd; [ "$kernel" = auto ] || tool=rerankd-$kernel
      if [ "$mode" = docs ]; then
        ours=$(RERANKD_KERNEL=$kernel RAYON_NUM_THREADS=$threads "$bin" bench --config "$config" --docs "$b" --doc-len "$l" --query-len 16 --score-batch "$b" --steps "$steps" --precision "$precision" --json)
      else
        ours=$(RERANKD_KERNEL=$kernel RAYON_NUM_THREADS=$threads "$bin" bench --config "$config" --batch "$b" --length "$l" --steps "$steps" --only "$mode" --precision "$precision" --json)
      fi
      echo "{\"tool\":\"$tool\",\"shape\":\"$s\",\"round\":$r,\"out\":$ours}" | tee -a "$out"
    done
    flag=""; [ "$mode" = train ] || flag="--score"
    [ "$mode" = docs ] && l=$((60 + 16 + l))
    peer=$("$py" "$peer_dir/peer_torch_lora.py" $flag --batch "$b" --seq "$l" --steps "$steps" --threads "$threads" $peer_precision 2>/dev/null | tail -1)
    echo "{\"tool\":\"torch\",\"shape\":\"$s\",\"round\":$r,\"out\":$peer}" | tee -a "$out"
  done
done
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1) (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p'); flags: $(grep -o -w -E 'amx_tile|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '))"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def pick(r):
    o = r["out"]
    if r["tool"] != "torch":
        kind = r["shape"].split(":")[0]
        ms = {"train": o.get("step_ms_median"), "score": o.get("score_ms_median"), "docs": o.get("shared_prefix_ms_median")}[kind]
        return ms / 1e3, o["peak_rss_mb"]
    return o.get("step_s_median", o.get("batch_s_median")), o["peak_rss_mb"]
def pairs(s):
    kind, bl = s.split(":")
    return None if kind == "train" else int(bl.split("x")[0])
print("\n| shape | tool | rerankd s | torch s | time ratio | pairs/s ratio | rerankd MB | torch MB | memory ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for s in dict.fromkeys(r["shape"] for r in rows):
    peer = [pick(r) for r in rows if r["shape"] == s and r["tool"] == "torch"]
    pt, pm = statistics.median(t for t, _ in peer), max(m for _, m in peer)
    for tool in dict.fromkeys(r["tool"] for r in rows if r["tool"] != "torch"):
        ours = [pick(r) for r in rows if r["shape"] == s and r["tool"] == tool]
        ot, om = statistics.median(t for t, _ in ours), max(m for _, m in ours)
        pr = f"{pt/ot:.2f}" if pairs(s) else ""
        print(f"| {s} | {tool} | {ot:.2f} | {pt:.2f} | {ot/pt:.2f} | {pr} | {om} | {pm} | {om/pm:.2f} |")
PY
rm -f "$out"
