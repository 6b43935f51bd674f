#!/bin/bash
# Makes (once per machine) the Python environment for the PyTorch + peft peer and prints its python.
# Usage: py=$(benches/peer/setup_peer.sh); $py benches/peer/peer_torch_lora.py --batch 1 --seq 256 --steps 5
set -e
ENVDIR=${PEER_ENV:-$HOME/.cache/rerankd-peer-torch}
if [ ! -x "$ENVDIR/bin/python" ] || ! "$ENVDIR/bin/python" -c "import torch, transformers, peft" 2>/dev/null; then
  python3 -m venv "$ENVDIR"
  "$ENVDIR/bin/pip" install -q torch transformers peft safetensors numpy >"$ENVDIR.install.log" 2>&1
fi
echo "$ENVDIR/bin/python"
