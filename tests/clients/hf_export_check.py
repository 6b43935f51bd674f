"""Loads a `rerankd export` directory in Hugging Face transformers and prints, per document, the
score and the logit (yes - no for `merged`, the single logit for `seq-cls`) as JSON lines, to
compare with `rerankd score --model DIR --json` on the same query and documents.

    python tests/clients/hf_export_check.py DIR QUERY DOC [DOC ...]
"""
import json
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

d, query, docs = sys.argv[1], sys.argv[2], sys.argv[3:]
info = json.load(open(f"{d}/rerankd_export.json"))
tok = Tokenizer.from_file(f"{d}/tokenizer.json")
torch.set_grad_enabled(False)
if info["format"] == "seq-cls":
    model = AutoModelForSequenceClassification.from_pretrained(d, torch_dtype=torch.float32).eval()
else:
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
yes, no = tok.token_to_id("yes"), tok.token_to_id("no")
for i, doc in enumerate(docs):
    text = f"{PREFIX}<Instruct>: {info['instruction']}\n<Query>: {query}\n<Document>: {doc}{SUFFIX}"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    out = model(input_ids=ids).logits
    logit = float(out[0, 0]) if info["format"] == "seq-cls" else float(out[0, -1, yes] - out[0, -1, no])
    print(json.dumps({"index": i, "score": float(torch.sigmoid(torch.tensor(logit))), "logit": logit}))
