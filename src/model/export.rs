//! Export: a LoRA adapter folded into its base checkpoint as a standard Hugging Face checkpoint,
//! either `Qwen3ForCausalLM` (merged) or `Qwen3ForSequenceClassification` with one logit whose
//! row is E[yes] - E[no] (seq-cls).
//!
//! Tensors are streamed: each is read from the memory-mapped base, merged (W + scale * B @ A in
//! f32, cast once) and written by the safetensors writer when it reaches that tensor, so at most
//! one merged tensor is held beside the mapped input. A tensor the adapter does not touch and whose
//! dtype does not change is copied byte for byte from the map.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::checkpoint::CheckpointDir;
use super::lora::{LoraSet, Target};
use super::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Merged,
    SeqCls,
}

/// Hugging Face's default shard size for `save_pretrained` ("5GB").
pub const HF_MAX_SHARD_BYTES: u64 = 5_000_000_000;

pub struct ExportSpec<'a> {
    pub base: &'a CheckpointDir,
    pub lora: &'a LoraSet,
    pub format: Format,
    /// None: the base checkpoint's own dtype.
    pub dtype: Option<DType>,
    /// Token ids of `yes`, `no` and the pad token (seq-cls head and `pad_token_id`).
    pub yes_id: u32,
    pub no_id: u32,
    pub pad_id: u32,
    pub max_shard_bytes: u64,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
    pub dtype: String,
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::F32,
    }
}

/// `model.layers.{i}.{self_attn|mlp}.{proj}.weight` -> (i, target).
fn lora_target(name: &str) -> Option<(usize, Target)> {
    let rest = name.strip_prefix("model.layers.").or_else(|| name.strip_prefix("layers."))?;
    let (layer, rest) = rest.split_once('.')?;
    let mut parts = rest.split('.');
    let (_module, proj, w) = (parts.next()?, parts.next()?, parts.next()?);
    (w == "weight" && parts.next().is_none()).then_some(())?;
    Some((layer.parse().ok()?, Target::parse(proj)?))
}

/// Where a tensor's bytes come from when the writer asks for them.
enum Source {
    /// A base tensor, merged with the LoRA pair when it has one, cast to the export dtype.
    Base { name: String, delta: Option<(Tensor, Tensor)> },
    /// The seq-cls head: computed up front (one row).
    Owned(Vec<u8>),
}

struct Lazy<'a> {
    st: &'a MmapedSafetensors,
    source: Source,
    shape: Vec<usize>,
    dtype: DType,
    scale: f64,
}

fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        other => return Err(ModelError::Invalid(format!("cannot export a {other:?} tensor"))),
    })
}

impl Lazy<'_> {
    fn produce(&self) -> Result<Cow<'_, [u8]>> {
        let (name, delta) = match &self.source {
            Source::Owned(b) => return Ok(Cow::Borrowed(b)),
            Source::Base { name, delta } => (name, delta),
        };
        let view = self.st.get(name)?;
        if delta.is_none() && view.dtype() == st_dtype(self.dtype) {
            return Ok(Cow::Borrowed(view.data()));
        }
        let w = self.st.load(name, &Device::Cpu)?;
        let w = match delta {
            None => w,
            // W + scale * B @ A, in f32, cast once.
            Some((a, b)) => (w.to_dtype(DType::F32)? + (b.matmul(a)? * self.scale)?)?,
        };
        Ok(Cow::Owned(bytes_of(&w.to_dtype(self.dtype)?)?))
    }
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // The writer cannot take an error here: a tensor that fails to merge (it was readable a
        // moment ago, when its shape was checked) ends the process with the reason.
        self.produce().unwrap_or_else(|e| panic!("exporting a tensor: {e}"))
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Writes the weights of the export into `out` (an empty directory) and its `config.json`.
pub fn write_weights(spec: &ExportSpec, out: &Path) -> Result<Written> {
    let cfg = spec.base.read_config()?;
    // SAFETY: mapped read-only, as every safetensors reader does.
    let st = unsafe { MmapedSafetensors::multi(&spec.base.weights) }?;
    let mut names: Vec<(String, Vec<usize>, safetensors::Dtype)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.dtype())).collect();
    names.sort();
    let embed = names
        .iter()
        .find(|(n, _, _)| n == "model.embed_tokens.weight" || n == "embed_tokens.weight")
        .ok_or_else(|| ModelError::Invalid("the base checkpoint has no embed_tokens.weight".into()))?;
    let base_dtype = match embed.2 {
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F16 => DType::F16,
        _ => DType::F32,
    };
    let dtype = spec.dtype.unwrap_or(base_dtype);
    let scale = spec.lora.cfg.scale();
    let mut views: Vec<(String, Lazy)> = Vec::new();
    let mut merged = 0;
    for (name, shape, _) in &names {
        if spec.format == Format::SeqCls && name == "lm_head.weight" {
            continue; // no vocabulary-sized head at all
        }
        let delta = match lora_target(name).and_then(|(i, t)| spec.lora.get(i, t)) {
            Some(p) => {
                merged += 1;
                Some((p.a.as_tensor().to_dtype(DType::F32)?, p.b.as_tensor().to_dtype(DType::F32)?))
            }
            None => None,
        };
        // A bare Qwen3Model checkpoint has no `model.` prefix; transformers' classes want it.
        let out_name =
            if name.starts_with("model.") || name == "lm_head.weight" { name.clone() } else { format!("model.{name}") };
        let source = Source::Base { name: name.clone(), delta };
        views.push((out_name, Lazy { st: &st, source, shape: shape.clone(), dtype, scale }));
    }
    let expected = spec.lora.cfg.targets.len() * cfg.num_hidden_layers;
    if merged != expected {
        return Err(ModelError::Invalid(format!(
            "the adapter has {expected} LoRA pairs but only {merged} matching base tensors were found"
        )));
    }
    if spec.format == Format::SeqCls {
        // score.weight = E[yes] - E[no] from the rows the reranker reads (lm_head when untied).
        let head = if !cfg.tie_word_embeddings && names.iter().any(|(n, _, _)| n == "lm_head.weight") {
            "lm_head.weight"
        } else {
            embed.0.as_str()
        };
        let rows = st.load(head, &Device::Cpu)?.to_dtype(DType::F32)?;
        let ids = Tensor::new(&[spec.yes_id, spec.no_id], &Device::Cpu)?;
        let yn = rows.index_select(&ids, 0)?;
        let row = (yn.get(0)? - yn.get(1)?)?.unsqueeze(0)?;
        let bytes = bytes_of(&row.to_dtype(dtype)?)?;
        views.push((
            "score.weight".into(),
            Lazy { st: &st, source: Source::Owned(bytes), shape: vec![1, cfg.hidden_size], dtype, scale },
        ));
    }
    let total: u64 = views.iter().map(|(_, v)| safetensors::View::data_len(v) as u64).sum();
    // Shards, in name order, each at most max_shard_bytes (a bigger single tensor goes alone).
    let mut shards: Vec<Vec<(String, Lazy)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (n, v) in views {
        let len = safetensors::View::data_len(&v) as u64;
        if size > 0 && size + len > spec.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        shards.last_mut().expect("one shard at least").push((n, v));
    }
    let count = shards.len();
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut tensors = 0;
    for (k, shard) in shards.into_iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        };
        for (n, _) in &shard {
            weight_map.insert(n.clone(), file.clone());
        }
        tensors += shard.len();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(shard, Some(meta), &out.join(&file))
            .map_err(|e| ModelError::Write { path: out.join(&file), source: Box::new(e) })?;
        files.push(file);
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_text(&out.join("model.safetensors.index.json"), &serde_json::to_string_pretty(&index).expect("json"))?;
        files.push("model.safetensors.index.json".into());
    }
    write_text(&out.join("config.json"), &serde_json::to_string_pretty(&export_config(spec, dtype)?).expect("json"))?;
    files.push("config.json".into());
    Ok(Written { files, tensors, bytes: total, dtype: dtype_name(dtype).into() })
}

/// The base's config.json, with the architecture and dtype of the export (and, for seq-cls, one
/// label and the pad token the classifier pools on).
fn export_config(spec: &ExportSpec, dtype: DType) -> Result<Value> {
    let text =
        std::fs::read_to_string(&spec.base.config).map_err(|e| ModelError::io(&spec.base.config, "reading", e))?;
    let mut c: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::file(&spec.base.config, None, e.to_string()))?;
    let arch = match spec.format {
        Format::Merged => "Qwen3ForCausalLM",
        Format::SeqCls => "Qwen3ForSequenceClassification",
    };
    c["architectures"] = json!([arch]);
    c["torch_dtype"] = dtype_name(dtype).into();
    c["dtype"] = dtype_name(dtype).into();
    if spec.format == Format::SeqCls {
        c["num_labels"] = 1.into();
        c["id2label"] = json!({"0": "LABEL_0"});
        c["label2id"] = json!({"LABEL_0": 0});
        c["pad_token_id"] = spec.pad_id.into();
    }
    Ok(c)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| ModelError::io(path, "writing", e))
}

/// `rerankd_export.json`: what an export was made from, and how to prompt it. `rerankd score
/// --model DIR` and serve read the instruction and max_length from it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    pub run_id: String,
    pub corpus: Option<String>,
    /// sha256 of the adapter's `adapter_model.safetensors`.
    pub adapter_digest: String,
    pub base_model: String,
    pub instruction: String,
    pub max_length: usize,
    pub format: String,
    pub dtype: String,
    #[serde(default)]
    pub metrics: Value,
    #[serde(default)]
    pub primary_metric: Option<String>,
    /// The run's state when it was exported with `--force` (it had not completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_from: Option<String>,
}

pub const EXPORT_INFO: &str = "rerankd_export.json";

impl ExportInfo {
    /// The info of an export directory, if it is one.
    pub fn read(dir: &Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(EXPORT_INFO)).ok()?).ok()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_text(&dir.join(EXPORT_INFO), &serde_json::to_string_pretty(self).expect("json"))
    }

    /// The Hub model card: YAML front matter, the prompt, and how to call the export.
    pub fn model_card(&self, format: Format) -> String {
        use std::fmt::Write;
        let metrics: Vec<(String, f64)> = self
            .metrics
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default();
        let mut y = String::new();
        let _ = writeln!(y, "---");
        // The Hub takes `base_model` only as a model id (`org/name`); a local path is named below.
        if is_hub_id(&self.base_model) {
            let _ = writeln!(y, "base_model: {}", yaml_str(&self.base_model));
        }
        let _ = writeln!(y, "library_name: transformers");
        let _ = writeln!(y, "pipeline_tag: text-ranking");
        let _ = writeln!(y, "tags:\n- reranker\n- cross-encoder\n- qwen3\n- lora\n- rerankd");
        if !metrics.is_empty() {
            let _ = writeln!(
                y,
                "model-index:\n- name: {}\n  results:\n  - task:\n      type: text-ranking",
                yaml_str(&self.run_id)
            );
            let _ = writeln!(
                y,
                "    dataset:\n      name: {}\n      type: rerankd-feedback\n      split: dev\n    metrics:",
                yaml_str(&format!("{} feedback (dev queries)", self.corpus.as_deref().unwrap_or("corpus")))
            );
            for (k, v) in &metrics {
                let _ = writeln!(y, "    - type: {}\n      value: {v:.4}", k.replace('@', "_at_"));
            }
        }
        let _ = writeln!(y, "---\n");
        let kind = match format {
            Format::Merged => {
                "the LoRA adapter merged into a `Qwen3ForCausalLM`: score = sigmoid(logit(\"yes\") - logit(\"no\")) at the last token"
            }
            Format::SeqCls => {
                "a `Qwen3ForSequenceClassification` with one logit, whose row is E[yes] - E[no]: score = sigmoid(logit)"
            }
        };
        // The template itself, with the placeholders the recipes fill.
        let prompt = super::prompt::render(&self.instruction, "{query}", "{document}");
        let _ = writeln!(y, "# {}\n", self.run_id);
        let _ = writeln!(
            y,
            "A Qwen3 reranker fine-tuned with rerankd on relevance feedback for `{}`, exported as {kind}.\n",
            self.corpus.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            y,
            "- base model: `{}`\n- run: `{}` (adapter sha256 `{}`)\n- dtype: {}\n- max_length: {} tokens (only the document is cut to fit, then the query)\n",
            self.base_model, self.run_id, self.adapter_digest, self.dtype, self.max_length
        );
        if !metrics.is_empty() {
            let _ = writeln!(y, "| metric (dev queries) | value |\n|---|---|");
            for (k, v) in &metrics {
                let _ = writeln!(y, "| {k} | {v:.4} |");
            }
            let _ = writeln!(y);
        }
        let _ = writeln!(
            y,
            "## Prompt\n\nEvery (query, document) pair must be formatted exactly like this (the instruction is the one used in training):\n\n```text\n{prompt}\n```\n"
        );
        let _ = writeln!(y, "## How to call it\n");
        // Python literals: JSON strings are valid Python strings.
        let lit = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let head = format!(
            "import torch\nfrom transformers import AutoTokenizer, {class}\n\nDIR = \".\"  # this directory\nINSTRUCTION = {}\nMAX_LENGTH = {}\nPREFIX = {}\nSUFFIX = {}\n\ntok = AutoTokenizer.from_pretrained(DIR)\nmodel = {class}.from_pretrained(DIR).eval()\nprefix = tok(PREFIX, add_special_tokens=False).input_ids\nsuffix = tok(SUFFIX, add_special_tokens=False).input_ids\n\n\ndef encode(query, document):\n    # As rerankd: the prompt's own tokens never cut, the end of the document (then of the query) cut to fit.\n    body = tok(f\"<Instruct>: {{INSTRUCTION}}\\n<Query>: {{query}}\\n<Document>: {{document}}\", add_special_tokens=False,\n               truncation=True, max_length=MAX_LENGTH - len(prefix) - len(suffix)).input_ids\n    return prefix + body + suffix\n",
            lit(&self.instruction),
            self.max_length,
            lit(super::prompt::PREFIX),
            lit(super::prompt::SUFFIX),
            class = match format {
                Format::SeqCls => "AutoModelForSequenceClassification",
                Format::Merged => "AutoModelForCausalLM",
            }
        );
        let rerank = match format {
            Format::SeqCls => {
                "\n\ndef rerank(query, documents):\n    batch = tok.pad({\"input_ids\": [encode(query, d) for d in documents]}, padding=True, return_tensors=\"pt\")\n    with torch.no_grad():\n        return torch.sigmoid(model(**batch).logits[:, 0]).tolist()\n"
            }
            Format::Merged => {
                "YES, NO = tok.convert_tokens_to_ids(\"yes\"), tok.convert_tokens_to_ids(\"no\")\ntok.padding_side = \"left\"\n\n\ndef rerank(query, documents):\n    batch = tok.pad({\"input_ids\": [encode(query, d) for d in documents]}, padding=True, return_tensors=\"pt\")\n    with torch.no_grad():\n        last = model(**batch).logits[:, -1]\n    return torch.sigmoid(last[:, YES] - last[:, NO]).tolist()\n"
            }
        };
        let _ = writeln!(
            y,
            "transformers (scores as `rerankd score`; `rerank(query, documents)` gives one score in [0, 1] per document):\n\n```python\n{head}{rerank}\n\nprint(rerank(\"what is rust\", [\"Rust is a systems programming language.\", \"Bananas are yellow.\"]))\n```\n"
        );
        match format {
            Format::SeqCls => {
                let _ = writeln!(
                    y,
                    "sentence-transformers: `CrossEncoder(DIR)` loads this model, but its own pair tokenization and truncation do not build the prompt above (and a long document loses the prompt's end). Use its model and tokenizer with the function above:\n\n```python\nfrom sentence_transformers import CrossEncoder\n\nce = CrossEncoder(DIR)\ntok, model = ce.tokenizer, ce.model.eval()\nprint(rerank(\"what is rust\", [\"Rust is a systems programming language.\", \"Bananas are yellow.\"]))\n```\n"
                );
                let _ = writeln!(
                    y,
                    "vLLM (not run by rerankd's tests): `vllm serve DIR --runner pooling` (or `LLM(model=DIR, runner=\"pooling\")` and `llm.score`) scores pairs with its `/rerank` and `/score` endpoints; format the query as `PREFIX + \"<Instruct>: INSTRUCTION\\n<Query>: QUERY\\n\"` and each document as `\"<Document>: DOCUMENT\" + SUFFIX`, as the Qwen3-Reranker examples do, and cut long documents to fit MAX_LENGTH first (vLLM's truncation would cut the prompt's end). The `--task score` flag of older vLLM releases is gone.\n"
                );
                let _ = writeln!(
                    y,
                    "TEI: text-embeddings-inference does not serve Qwen3 sequence classifiers (\"`classifier` model type is not supported for Qwen3\", as of 1.9.3: https://github.com/huggingface/text-embeddings-inference/blob/main/backends/candle/src/models/qwen3.rs); serve it with `rerankd serve --model DIR` (TEI's `/rerank` API included) or vLLM.\n"
                );
            }
            Format::Merged => {
                let _ = writeln!(
                    y,
                    "sentence-transformers (`CrossEncoder`) and vLLM load the single-logit form: export with `--format seq-cls` for them (vLLM can also score this causal LM with `--hf-overrides` naming the yes/no tokens, as for Qwen3-Reranker). TEI serves neither Qwen3 form.\n"
                );
            }
        }
        let _ = writeln!(
            y,
            "With rerankd itself: `rerankd score --model DIR --query ... --doc ...` reads the instruction and max_length from `rerankd_export.json`."
        );
        y
    }
}

/// Whether `s` reads as a Hugging Face Hub model id (`org/name`, no path syntax) rather than a
/// local directory.
fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: &str| {
        !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if ok(a) && ok(b))
        && !std::path::Path::new(s).exists()
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The tokenizer files of the base that an export carries (those that exist).
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// Copies the tokenizer files (and, for a causal LM, generation_config.json) from the base.
pub fn copy_tokenizer(base: &CheckpointDir, format: Format, out: &Path) -> Result<Vec<String>> {
    let mut names: Vec<&str> = TOKENIZER_FILES.to_vec();
    if format == Format::Merged {
        names.push("generation_config.json");
    }
    let mut copied = Vec::new();
    for n in names {
        let from: PathBuf = base.dir.join(n);
        if from.is_file() {
            std::fs::copy(&from, out.join(n)).map_err(|e| ModelError::io(&from, "copying", e))?;
            copied.push(n.to_string());
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hub_ids_are_a_base_model() {
        assert!(is_hub_id("Qwen/Qwen3-Reranker-0.6B"));
        for not in ["/models/qwen", "./qwen", "../a/b", "a/b/c", "qwen", "a b/c", ""] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn lora_targets_are_found_by_their_hf_names() {
        assert_eq!(lora_target("model.layers.3.self_attn.q_proj.weight"), Some((3, Target::Q)));
        assert_eq!(lora_target("model.layers.10.mlp.down_proj.weight"), Some((10, Target::Down)));
        assert_eq!(lora_target("layers.0.self_attn.o_proj.weight"), Some((0, Target::O)));
        assert_eq!(lora_target("model.layers.3.self_attn.q_norm.weight"), None);
        assert_eq!(lora_target("model.embed_tokens.weight"), None);
        assert_eq!(lora_target("model.layers.3.self_attn.q_proj.bias"), None);
    }
}
