"""Peer baseline: one LoRA training step of a Qwen3-0.6B-shaped reranker in PyTorch+PEFT on CPU.
(Copied from the team's ../shared/bench/peer_torch_lora.py, plus `--device cuda` for benches/gpu.sh:
the model and inputs on the GPU, timings synchronized, peak GPU memory reported as well.)
Random weights of the real shape (no download). Prints JSON with median step time and peak RSS.
usage: python peer_torch_lora.py [--seq 256] [--batch 1] [--steps 4] [--full-logits] [--layers 28]
"""
import argparse, json, resource, statistics, time
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from peft import LoraConfig, get_peft_model

p = argparse.ArgumentParser()
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--layers", type=int, default=28)
p.add_argument("--full-logits", action="store_true", help="materialize B x L x V logits, as the naive trainer does")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--score", action="store_true", help="time scoring (no grad) instead of a training step")
p.add_argument("--bf16", action="store_true", help="score under torch.autocast(bfloat16), the peer of rerankd --precision bf16")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=a.layers,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
model = Qwen3ForCausalLM(cfg).float().to(a.device)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
YES, NO = 9693, 2152
ids = torch.randint(0, 151000, (a.batch, a.seq)).to(a.device)
labels = torch.tensor([i % 2 for i in range(a.batch)], dtype=torch.float32).to(a.device)
def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()
def gpu_mb():
    return round(torch.cuda.max_memory_allocated() / 2**20) if a.device == "cuda" else None
times = []
if a.score:
    model.eval()
    import contextlib
    cast = torch.autocast(a.device, dtype=torch.bfloat16) if a.bf16 else contextlib.nullcontext()
    with torch.no_grad(), cast:
        for s in range(a.steps + 1):
            t0 = time.perf_counter()
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
            _ = torch.sigmoid(logits[:, YES] - logits[:, NO])
            sync()
            if s > 0:
                times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peer": "torch", "mode": "score", "precision": "bf16" if a.bf16 else "f32", "seq": a.seq, "batch": a.batch, "layers": a.layers,
                      "batch_s_median": round(statistics.median(times), 3), "pairs_per_s": round(a.batch / statistics.median(times), 2),
                      "peak_rss_mb": round(rss_mb), "device": a.device, "peak_gpu_mb": gpu_mb()}))
    raise SystemExit(0)
for s in range(a.steps + 1):
    t0 = time.perf_counter()
    if a.full_logits:
        logits = model(input_ids=ids).logits[:, -1, :]
    else:
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
    score = logits[:, YES] - logits[:, NO]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(score, labels)
    loss.backward()
    opt.step(); opt.zero_grad()
    sync()
    dt = time.perf_counter() - t0
    if s > 0:
        times.append(dt)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peer": "torch+peft", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "seq": a.seq, "batch": a.batch, "layers": a.layers, "full_logits": a.full_logits,
                  "step_s_median": round(statistics.median(times), 3), "peak_rss_mb": round(rss_mb),
                  "device": a.device, "peak_gpu_mb": gpu_mb()}))
