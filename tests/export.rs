//! `rerankd export` on the fixture: merged and seq-cls forms score as the adapter does, their
//! tensors and config are what transformers' Qwen3ForCausalLM / Qwen3ForSequenceClassification
//! expect, an untied and a sharded base work, and a refused or failed export leaves nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::{Value, json};

const RUN: &str = "docs__20261127_120000";

/// A root whose corpus `docs` has the fixture's PEFT adapter promoted on base `model`.
fn root_on(model: &str) -> Root {
    let root = Root::new("");
    let dir = root.dir.join("models/docs/adapters").join(RUN);
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3/peft_adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let manifest = json!({"model": model, "corpus": "docs", "run_id": RUN, "max_length": 100,
        "instruction": "Given a question, find the passage that answers it", "primary_metric": "ndcg@10",
        "metrics": {"ndcg@10": 0.5, "mrr@10": 0.4}});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::os::unix::fs::symlink(Path::new("adapters").join(RUN), root.dir.join("models/docs/current")).unwrap();
    root
}

fn adapter_dir(root: &Root) -> PathBuf {
    root.dir.join("models/docs/adapters").join(RUN)
}

fn export(root: &Root, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = root.cli_cmd(["export"]).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.code(),
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const QUERY: &str = "what is rust";

fn docs() -> Vec<String> {
    vec![
        "Rust is a systems programming language.".into(),
        "Bananas are yellow.".into(),
        "The borrow checker enforces ownership at compile time. ".repeat(12),
        "Cargo builds Rust code.".into(),
    ]
}

/// `rerankd score --json` of the test's query and documents with `extra`: per document (score,
/// yes - no).
/// Scores on the `f32` kernel path (`RERANKD_KERNEL=f32`): these tests hold an export to the
/// adapter it merges at f32's 1e-5, which the split paths' products (AMX's, `avx512-bf16`'s: 16
/// significant bits of the activations, see the model library) would blur on the base model's
/// side; `tests/fixture.rs` holds every path to the reference numbers.
fn score(root: &Root, extra: &[&str]) -> Vec<(f64, f64)> {
    score_cli_env(root, extra, QUERY, &docs(), &[("RERANKD_KERNEL", "f32")])
}

fn max_diff(a: &[(f64, f64)], b: &[(f64, f64)]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, l), (x, y)| (f64::max(s, (x.0 - y.0).abs()), f64::max(l, (x.1 - y.1).abs())))
}

/// name -> (dtype, shape), from the safetensors headers of an export (one file or an index).
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let files: Vec<PathBuf> = match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        Ok(t) => {
            let idx: Value = serde_json::from_str(&t).unwrap();
            let mut f: Vec<String> =
                idx["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap().to_string()).collect();
            f.sort();
            f.dedup();
            f.into_iter().map(|n| dir.join(n)).collect()
        }
        Err(_) => vec![dir.join("model.safetensors")],
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (k, v) in header.as_object().unwrap() {
            if k == "__metadata__" {
                continue;
            }
            let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            out.insert(k.clone(), (v["dtype"].as_str().unwrap().to_string(), shape));
        }
    }
    out
}

/// What transformers' Qwen3 classes hold (modeling_qwen3.py: Qwen3Model with embed_tokens,
/// layers of Qwen3DecoderLayer {self_attn: q/k/v/o_proj (no bias: attention_bias false), q_norm,
/// k_norm; mlp: gate/up/down_proj (no bias); input_layernorm, post_attention_layernorm}, norm;
/// Qwen3ForCausalLM adds lm_head (tied: not stored), Qwen3ForSequenceClassification adds
/// score = Linear(hidden, num_labels, bias=False)).
fn expected_tensors(c: &Value, seq_cls: bool, lm_head: bool) -> BTreeMap<String, Vec<usize>> {
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (d, hd, inter, vocab) = (u("hidden_size"), u("head_dim"), u("intermediate_size"), u("vocab_size"));
    let (q, kv) = (u("num_attention_heads") * hd, u("num_key_value_heads") * hd);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![vocab, d]);
    m.insert("model.norm.weight".to_string(), vec![d]);
    for i in 0..u("num_hidden_layers") {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("self_attn.q_proj.weight", vec![q, d]),
            ("self_attn.k_proj.weight", vec![kv, d]),
            ("self_attn.v_proj.weight", vec![kv, d]),
            ("self_attn.o_proj.weight", vec![d, q]),
            ("self_attn.q_norm.weight", vec![hd]),
            ("self_attn.k_norm.weight", vec![hd]),
            ("mlp.gate_proj.weight", vec![inter, d]),
            ("mlp.up_proj.weight", vec![inter, d]),
            ("mlp.down_proj.weight", vec![d, inter]),
        ] {
            m.insert(format!("{p}.{n}"), s);
        }
    }
    if seq_cls {
        m.insert("score.weight".into(), vec![1, d]);
    } else if lm_head {
        m.insert("lm_head.weight".into(), vec![vocab, d]);
    }
    m
}

fn check_layout(dir: &Path, seq_cls: bool, lm_head: bool, dtype: &str) {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let got = tensors(dir);
    let want = expected_tensors(&config, seq_cls, lm_head);
    let got_shapes: BTreeMap<String, Vec<usize>> = got.iter().map(|(k, (_, s))| (k.clone(), s.clone())).collect();
    assert_eq!(got_shapes, want, "tensor names and shapes of {}", dir.display());
    let st_dtype = match dtype {
        "float32" => "F32",
        "bfloat16" => "BF16",
        _ => "F16",
    };
    assert!(got.values().all(|(d, _)| d == st_dtype), "not all {st_dtype}");
    let arch = if seq_cls { "Qwen3ForSequenceClassification" } else { "Qwen3ForCausalLM" };
    assert_eq!(config["architectures"], json!([arch]));
    assert_eq!(config["torch_dtype"], dtype);
    assert_eq!(config["model_type"], "qwen3");
    if seq_cls {
        assert_eq!(config["num_labels"], 1);
        assert_eq!(config["id2label"], json!({"0": "LABEL_0"}));
        assert_eq!(config["pad_token_id"], 151643, "the classifier pools the last non-pad token");
    }
    for f in ["tokenizer.json", "README.md", "rerankd_export.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(card.starts_with("---\n"), "{card}");
    // The base is a local directory here: the Hub takes `base_model` only as a model id.
    assert!(!card.contains("base_model:"), "{card}");
    for needle in [
        "library_name: transformers",
        "pipeline_tag: text-ranking",
        "ndcg_at_10",
        "<Instruct>: Given a question",
        "max_length: 100",
        "CrossEncoder",
    ] {
        assert!(card.contains(needle), "model card lacks {needle}:\n{card}");
    }
    let info: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("rerankd_export.json")).unwrap()).unwrap();
    assert_eq!(info["run_id"], RUN);
    assert_eq!(info["max_length"], 100);
    assert_eq!(info["adapter_digest"].as_str().unwrap().len(), 64);
}

#[test]
fn merged_and_seq_cls_exports_score_as_the_adapter_does() {
    let root = root_on(&fixture_model());
    let tmp = root.dir.parent().unwrap();
    let adapter = adapter_dir(&root);
    let want = score(&root, &["--adapter", adapter.to_str().unwrap()]);

    let merged = tmp.join("merged");
    let (code, report, err) =
        export(&root, &["--corpus", "docs", "--format", "merged", "--dtype", "f32", "--out", merged.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    eprintln!("merged: {report}");
    check_layout(&merged, false, false, "float32");
    let got = score(&root, &["--model", merged.to_str().unwrap()]);
    let (ds, dl) = max_diff(&got, &want);
    eprintln!("merged f32 vs adapter: max |score diff| {ds:.2e}, max |logit diff| {dl:.2e}");
    assert!(ds <= 1e-5 && dl <= 1e-5, "{got:?} vs {want:?}");

    let cls = tmp.join("cls");
    let (code, _, err) = export(&root, &[RUN, "--format", "seq-cls", "--dtype", "f32", "--out", cls.to_str().unwrap()]);
    // A run id that is not in runs/ (this adapter was promoted by hand) is "no such run".
    assert_eq!(code, Some(3), "{err}");
    let (code, _, err) =
        export(&root, &["--corpus", "docs", "--format", "seq-cls", "--dtype", "f32", "--out", cls.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    check_layout(&cls, true, false, "float32");
    let got = score(&root, &["--model", cls.to_str().unwrap()]);
    let (ds, dl) = max_diff(&got, &want);
    eprintln!("seq-cls f32 vs adapter: max |score diff| {ds:.2e}, max |yes - no diff| {dl:.2e}");
    assert!(ds <= 1e-5 && dl <= 1e-5, "the single logit is not yes - no: {got:?} vs {want:?}");

    // bf16 (the fixture's own dtype, so the default): the rounding of the weights, measured.
    let bf = tmp.join("bf16");
    let (code, report, err) =
        export(&root, &["--corpus", "docs", "--format", "seq-cls", "--out", bf.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(report["dtype"], "bfloat16");
    check_layout(&bf, true, false, "bfloat16");
    let got = score(&root, &["--model", bf.to_str().unwrap()]);
    let (ds, dl) = max_diff(&got, &want);
    eprintln!("seq-cls bf16 vs adapter: max |score diff| {ds:.2e}, max |yes - no diff| {dl:.2e}");
    assert!(ds <= 5e-3 && dl <= 5e-2, "bf16 export off by {ds} / {dl}");

    // An existing, non-empty destination is refused and left alone; nothing temporary remains.
    let (code, _, err) = export(&root, &["--corpus", "docs", "--format", "merged", "--out", merged.to_str().unwrap()]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("not empty"), "{err}");
    let (code, _, _) =
        export(&root, &["--corpus", "nosuch", "--format", "merged", "--out", tmp.join("x").to_str().unwrap()]);
    assert_eq!(code, Some(3));
    assert!(!tmp.join("x").exists());
    assert_no_temporary_exports(tmp);
}

/// A copy of the fixture model rewritten by `f` (its tensors, its config).
fn variant(
    dir: &Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>, &mut Value),
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = PathBuf::from(fixture_model());
    let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    f(&mut t, &mut c);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

#[test]
fn an_untied_base_and_a_sharded_base_export_and_score_alike() {
    let tmp = tempfile::tempdir().unwrap();
    // Untied: an lm_head of its own (the embeddings scaled and shifted), tie_word_embeddings false.
    let untied = variant(&tmp.path().join("untied"), |t, c| {
        let e = t["model.embed_tokens.weight"].to_dtype(candle_core::DType::F32).unwrap();
        let head = ((e * 1.5).unwrap() + 0.01).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
        t.insert("lm_head.weight".into(), head);
        c["tie_word_embeddings"] = false.into();
    });
    let root = root_on(untied.to_str().unwrap());
    let want = score(&root, &["--adapter", adapter_dir(&root).to_str().unwrap()]);
    for (format, lm_head) in [("merged", true), ("seq-cls", false)] {
        let out = tmp.path().join(format!("untied-{format}"));
        let (code, _, err) =
            export(&root, &["--corpus", "docs", "--format", format, "--dtype", "f32", "--out", out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        check_layout(&out, format == "seq-cls", lm_head, "float32");
        let (ds, dl) = max_diff(&score(&root, &["--model", out.to_str().unwrap()]), &want);
        eprintln!("untied {format}: max |score diff| {ds:.2e}, |logit diff| {dl:.2e}");
        assert!(ds <= 1e-5 && dl <= 1e-5);
    }

    // Sharded: the fixture split into two files with an index, exported into shards as well.
    let sharded = tmp.path().join("sharded");
    variant(&sharded, |_, _| {});
    let all = candle_core::safetensors::load(sharded.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in all {
        let (part, file) = if k.contains("layers.1") || k.contains("norm.weight") && !k.contains("layers") {
            (&mut b, "model-00002-of-00002.safetensors")
        } else {
            (&mut a, "model-00001-of-00002.safetensors")
        };
        map.insert(k.clone(), file.into());
        part.insert(k, v);
    }
    candle_core::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let root = root_on(sharded.to_str().unwrap());
    let want = score(&root, &["--adapter", adapter_dir(&root).to_str().unwrap()]);
    let out = tmp.path().join("sharded-out");
    let (code, report, err) = export(
        &root,
        &[
            "--corpus",
            "docs",
            "--format",
            "merged",
            "--dtype",
            "f32",
            "--max-shard-mb",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let files: Vec<&str> = report["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(
        files.contains(&"model.safetensors.index.json")
            && files.iter().any(|f| f.ends_with("-of-00003.safetensors") || f.contains("-of-0000")),
        "{files:?}"
    );
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], report["bytes"]);
    check_layout(&out, false, false, "float32");
    let (ds, dl) = max_diff(&score(&root, &["--model", out.to_str().unwrap()]), &want);
    eprintln!("sharded in and out ({} files): max |score diff| {ds:.2e}, |logit diff| {dl:.2e}", files.len());
    assert!(ds <= 1e-5 && dl <= 1e-5);
}

/// What a careless or unlucky user meets: a run that did not complete is refused unless
/// `--force`; what a killed export left is removed by the next one; a second export to the same
/// destination while one runs is refused; a destination that is a symlink is written into its
/// target; every file has the same mode.
#[test]
fn exports_refuse_unfinished_runs_clean_up_and_write_through_symlinks() {
    let root = root_on(&fixture_model());
    let tmp = root.dir.parent().unwrap().to_path_buf();
    // A failed run with an adapter (what a dead attempt leaves).
    let run = "docs__20261127_130000";
    let dir = root.dir.join("runs").join(run);
    std::fs::create_dir_all(dir.join("adapter")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors", "manifest.json"] {
        std::fs::copy(adapter_dir(&root).join(f), dir.join("adapter").join(f)).unwrap();
    }
    let status = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1/root/runs/demo__20261203_113020/status.json"),
    )
    .unwrap()
    .replace("demo__20261203_113020", run)
    .replace("\"demo\"", "\"docs\"")
    .replace("\"completed\"", "\"failed\"");
    std::fs::write(dir.join("status.json"), status).unwrap();
    let out = tmp.join("unfinished");
    let (code, _, err) = export(&root, &[run, "--format", "merged", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("failed") && err.contains("--force"), "{err}");
    assert!(!out.exists());
    let (code, _, err) = export(&root, &[run, "--format", "merged", "--force", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let info: Value = serde_json::from_str(&std::fs::read_to_string(out.join("rerankd_export.json")).unwrap()).unwrap();
    assert_eq!(info["forced_from"], "failed", "{info}");

    // A killed export's temporary directory (of a pid long gone) is removed by the next export.
    let out = tmp.join("model");
    let stale = tmp.join(".model.rerankd-export-999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
    // Another export to the same destination is running (it holds the lock): refused.
    let lock = rerankd::store::FileLock::try_acquire(&tmp.join(".model.export.lock")).unwrap().unwrap();
    let (code, _, err) = export(&root, &["--corpus", "docs", "--format", "merged", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("another export"), "{err}");
    assert!(stale.exists(), "a running export's files were touched");
    drop(lock);
    let (code, _, err) = export(&root, &["--corpus", "docs", "--format", "merged", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!stale.exists(), "the killed export's directory is left");
    // Through a symlink to an empty directory.
    let (target, link) = (tmp.join("target-dir"), tmp.join("link"));
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, _, err) = export(&root, &["--corpus", "docs", "--format", "merged", "--out", link.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(target.join("model.safetensors").is_file());
    use std::os::unix::fs::PermissionsExt;
    let modes: std::collections::BTreeSet<u32> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().permissions().mode() & 0o777)
        .collect();
    assert_eq!(modes.len(), 1, "files of different modes: {modes:?}");
    assert_no_temporary_exports(&tmp);
}

/// No temporary export directory is left in `dir`.
fn assert_no_temporary_exports(dir: &Path) {
    let leftovers: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("rerankd-export"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
