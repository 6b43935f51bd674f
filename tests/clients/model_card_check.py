"""Runs the Python recipes of a `rerankd export` directory's model card (README.md) as written and
prints their scores as JSON lines, to compare with `rerankd score --model DIR --json`:

    python tests/clients/model_card_check.py DIR QUERY DOC [DOC ...]

Each ```python block runs in turn in one namespace, with `DIR = "."` pointed at DIR (the
sentence-transformers block only when sentence_transformers imports); after each, `rerank(QUERY,
DOCS)` is printed as {"recipe": i, "scores": [...]}.
"""
import json
import re
import sys

d, query, docs = sys.argv[1], sys.argv[2], sys.argv[3:]
card = open(f"{d}/README.md").read()
blocks = re.findall(r"```python\n(.*?)```", card, re.S)
ns = {}
for i, code in enumerate(blocks):
    code = code.replace('DIR = "."', f"DIR = {d!r}")
    if "sentence_transformers" in code:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            print(json.dumps({"recipe": i, "skipped": "sentence_transformers is not installed"}))
            continue
    exec(code, ns)
    print(json.dumps({"recipe": i, "scores": ns["rerank"](query, docs)}))
