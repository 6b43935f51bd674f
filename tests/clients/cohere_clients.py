"""Real rerank clients against rerankd serve: cohere (v1 and v2 clients) and LangChain's CohereRerank."""
import sys
import cohere
from langchain_cohere import CohereRerank
from langchain_core.documents import Document

base = sys.argv[1]
docs = ["Rust is a systems programming language.", "Bananas are yellow.", "Cargo builds Rust code."]
co = cohere.Client(api_key="unused", base_url=base)
r = co.rerank(model="docs", query="what is rust", documents=docs, top_n=2, return_documents=True)
print("cohere v1:", [(x.index, round(x.relevance_score, 6), x.document.text if x.document else None) for x in r.results], r.meta)
co2 = cohere.ClientV2(api_key="unused", base_url=base)
r2 = co2.rerank(model="docs", query="what is rust", documents=docs, top_n=3)
print("cohere v2:", [(x.index, round(x.relevance_score, 6)) for x in r2.results], r2.id)
lc = CohereRerank(client=co2, model="docs", top_n=2)
out = lc.compress_documents([Document(page_content=d) for d in docs], query="what is rust")
print("langchain:", [(d.page_content, round(d.metadata["relevance_score"], 6)) for d in out])
