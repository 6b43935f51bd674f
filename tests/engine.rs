//! Loading checkpoints in the layouts seen in the wild, adapter round trips, a real learning test,
//! and the `score` command line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rerankd::model::Reranker;
use rerankd::model::lora::{LoraConfig, LoraSet, Target};
use rerankd::model::qwen3::Dropout;
use rerankd::train::optim::{AdamW, Schedule, clip_grad_norm};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3")
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A copy of the fixture checkpoint with its weights replaced by `tensors` (one file or shards).
fn make_checkpoint(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    shards: usize,
    config_edit: impl Fn(&mut serde_json::Value),
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    config_edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    if shards == 1 {
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, n)| ((*n).clone(), tensors[*n].clone()))
            .collect();
        for n in part.keys() {
            weight_map.insert(n.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

const Q: &str = "what is the capital of france";
const DOCS: [&str; 3] = [
    "Paris is the capital and most populous city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Berlin is the capital of Germany.",
];

fn scores(spec: &str, lora: Option<&LoraSet>) -> Vec<(f32, f32)> {
    let r = Reranker::load(spec, &Device::Cpu).unwrap();
    let pairs: Vec<(&str, &str)> = DOCS.iter().map(|d| (Q, *d)).collect();
    r.score_pairs(&pairs, 512, 2, lora).unwrap().iter().map(|s| (s.yes_logit, s.no_logit)).collect()
}

fn assert_scores_close(a: &[(f32, f32)], b: &[(f32, f32)], tol: f32) {
    for (x, y) in a.iter().zip(b) {
        assert!((x.0 - y.0).abs() < tol && (x.1 - y.1).abs() < tol, "{x:?} vs {y:?}");
    }
}

#[test]
fn shards_and_dtypes_load_to_the_same_model() {
    let base = scores(fixture().to_str().unwrap(), None);
    let tmp = tempfile::tempdir().unwrap();
    let t = fixture_tensors();
    let sharded = tmp.path().join("sharded");
    make_checkpoint(&sharded, &t, 3, |_| {});
    assert_scores_close(&scores(sharded.to_str().unwrap(), None), &base, 1e-5);
    for (name, dt, tol) in [("f32", DType::F32, 1e-5), ("f16", DType::F16, 1e-3)] {
        let conv: HashMap<String, Tensor> = t.iter().map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap())).collect();
        let dir = tmp.path().join(name);
        make_checkpoint(&dir, &conv, 1, |_| {});
        assert_scores_close(&scores(dir.to_str().unwrap(), None), &base, tol);
    }
}

#[test]
fn rope_parameters_layout_and_untied_head() {
    let base = scores(fixture().to_str().unwrap(), None);
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    // An explicit lm_head of 2 x the embeddings doubles both logits: proof the head reads it.
    let lm_head = (t["model.embed_tokens.weight"].to_dtype(DType::F32).unwrap() * 2.0).unwrap();
    t.insert("lm_head.weight".into(), lm_head.to_dtype(DType::BF16).unwrap());
    let dir = tmp.path().join("untied");
    make_checkpoint(&dir, &t, 1, |c| {
        c["tie_word_embeddings"] = false.into();
        let theta = c.as_object_mut().unwrap().remove("rope_theta").unwrap();
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": theta});
    });
    let doubled: Vec<(f32, f32)> = base.iter().map(|(y, n)| (2.0 * y, 2.0 * n)).collect();
    assert_scores_close(&scores(dir.to_str().unwrap(), None), &doubled, 1e-4);
}

#[test]
fn repo_id_resolves_through_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--Acme--tiny-reranker");
    let snap = repo.join("snapshots/0123abcd");
    make_checkpoint(&snap, &fixture_tensors(), 1, |_| {});
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rerankd"))
        .env("HF_HOME", tmp.path())
        .env_remove("HF_HUB_CACHE")
        .args(["score", "--model", "Acme/tiny-reranker", "--query", Q, "--doc", DOCS[0], "--doc", DOCS[1], "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let want = scores(fixture().to_str().unwrap(), None);
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert!((l["yes_logit"].as_f64().unwrap() as f32 - want[i].0).abs() < 1e-5);
        assert!((l["no_logit"].as_f64().unwrap() as f32 - want[i].1).abs() < 1e-5);
        let s = l["score"].as_f64().unwrap();
        assert!(s > 0.0 && s < 1.0);
    }
}

fn load_err(dir: &Path) -> String {
    match Reranker::load(dir.to_str().unwrap(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_are_errors_that_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let t = fixture_tensors();
    let d = tmp.path().join("bad-config");
    make_checkpoint(&d, &t, 1, |c| c["hidden_size"] = "wide".into());
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    let d = tmp.path().join("no-tokenizer");
    make_checkpoint(&d, &t, 1, |_| {});
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");

    let d = tmp.path().join("garbage-weights");
    make_checkpoint(&d, &t, 1, |_| {});
    std::fs::write(d.join("model.safetensors"), b"this is not a safetensors file at all").unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors"), "{e}");

    let d = tmp.path().join("missing-tensor");
    let mut t2 = t.clone();
    t2.remove("model.layers.1.mlp.down_proj.weight");
    make_checkpoint(&d, &t2, 1, |_| {});
    let e = load_err(&d);
    assert!(e.contains("model.layers.1.mlp.down_proj.weight"), "{e}");

    let d = tmp.path().join("wrong-shape");
    make_checkpoint(&d, &t, 1, |c| c["intermediate_size"] = 40.into());
    let e = load_err(&d);
    assert!(e.contains("gate_proj") && e.contains("shape"), "{e}");
}

#[test]
fn long_query_and_document_are_truncated_never_the_template() {
    let r = Reranker::load(fixture().to_str().unwrap(), &Device::Cpu).unwrap();
    let floor = r.prompt.template_len(&r.instruction).unwrap();
    let long_q = "why is the sky blue on a clear day ".repeat(200);
    let long_d = "Rayleigh scattering of sunlight by the molecules of the atmosphere. ".repeat(200);
    for max in [floor + 1, floor + 30, 200] {
        let ids = r.encode(&long_q, &long_d, max).unwrap();
        assert!(ids.len() <= max && ids.len() >= max - 3, "max {max}: got {}", ids.len());
        let suffix = r.prompt.encode_text(rerankd::model::prompt::SUFFIX).unwrap();
        assert!(ids.ends_with(&suffix), "template suffix kept");
        let prefix = r.prompt.encode_text(rerankd::model::prompt::PREFIX).unwrap();
        assert!(ids.starts_with(&prefix), "template prefix kept");
    }
    let s = r.score_pairs(&[(&long_q, &long_d)], 128, 1, None).unwrap();
    assert!(s[0].score.is_finite());
    // It trains, too: a micro-step on the truncated pair yields finite loss and gradients.
    let lora =
        LoraSet::init(&LoraConfig::new(4, 8.0, 0.0, &[Target::Q, Target::V]), &r.model.cfg, 0, &Device::Cpu).unwrap();
    let ids = r.encode(&long_q, &long_d, 128).unwrap();
    let (loss, grads) = r.model.micro_step(&r.batch(&[ids.as_slice()]).unwrap(), &[1.0], &[1.0], &lora, None).unwrap();
    assert!(loss.is_finite() && !grads.is_empty());
    assert!(r.encode("q", "d", floor - 1).is_err(), "max_length below the template is an error");
}

#[test]
fn adapter_round_trip_scores_identically() {
    let r = Reranker::load(fixture().to_str().unwrap(), &Device::Cpu).unwrap();
    let cfg = LoraConfig::new(4, 8.0, 0.1, &[Target::Q, Target::V, Target::Down]);
    let lora = LoraSet::init(&cfg, &r.model.cfg, 3, &Device::Cpu).unwrap();
    // B starts at zero; give it values so the adapter changes the scores.
    for (i, v) in lora.vars().iter().enumerate() {
        let t = v.as_tensor();
        v.set(
            &(t + Tensor::ones(t.shape(), DType::F32, &Device::Cpu)
                .unwrap()
                .affine(0.01 * (i % 5) as f64, 0.02)
                .unwrap())
            .unwrap(),
        )
        .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    lora.save(tmp.path(), Some("tiny")).unwrap();
    let back = LoraSet::load(tmp.path(), &r.model.cfg, &Device::Cpu).unwrap();
    assert_eq!(back.cfg, cfg);
    let pairs: Vec<(&str, &str)> = DOCS.iter().map(|d| (Q, *d)).collect();
    let a = r.score_pairs(&pairs, 512, 3, Some(&lora)).unwrap();
    let b = r.score_pairs(&pairs, 512, 3, Some(&back)).unwrap();
    let base = r.score_pairs(&pairs, 512, 3, None).unwrap();
    assert_eq!(a, b);
    assert!(a.iter().zip(&base).any(|(x, y)| (x.score - y.score).abs() > 1e-4), "adapter has an effect");
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["lora_alpha"], 8.0);
}

/// Pairs for a task the tiny random model can learn in seconds: relevant documents name the
/// query word and read like an answer; irrelevant ones name another word and read like noise.
fn synthetic(n: usize, seed: u64) -> Vec<(String, String, f32)> {
    use rand::{Rng, SeedableRng};
    let words = ["apple", "river", "engine", "guitar", "planet", "violet", "castle", "pepper", "rocket", "meadow"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let q = words[rng.random_range(0..words.len())];
            let other = loop {
                let w = words[rng.random_range(0..words.len())];
                if w != q {
                    break w;
                }
            };
            let rel = i % 2 == 0;
            let doc = if rel { format!("{q} facts and details") } else { format!("{other} trivia of no use") };
            (q.to_string(), doc, if rel { 1.0 } else { 0.0 })
        })
        .collect()
}

fn pairwise_accuracy(r: &Reranker, lora: &LoraSet, data: &[(String, String, f32)]) -> f32 {
    let pairs: Vec<(&str, &str)> = data.iter().map(|(q, d, _)| (q.as_str(), d.as_str())).collect();
    let s = r.score_pairs(&pairs, 128, 16, Some(lora)).unwrap();
    let (mut good, mut total) = (0, 0);
    for i in (0..data.len()).step_by(2) {
        total += 1;
        if s[i].score > s[i + 1].score {
            good += 1;
        }
    }
    good as f32 / total as f32
}

#[test]
fn training_drives_loss_down_and_held_out_accuracy_up() {
    let r = Reranker::load(fixture().to_str().unwrap(), &Device::Cpu).unwrap();
    let cfg = LoraConfig::new(8, 16.0, 0.0, &Target::ALL);
    let lora = LoraSet::init(&cfg, &r.model.cfg, 0, &Device::Cpu).unwrap();
    let train = synthetic(256, 1);
    let dev = synthetic(64, 2);
    let before = pairwise_accuracy(&r, &lora, &dev);
    let steps = 300;
    let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), 0.0).unwrap();
    let sched = Schedule { lr: 3e-2, warmup_steps: 20, total_steps: steps };
    let mut dropout = Dropout::new(0.0, 0);
    let mut losses = Vec::new();
    for step in 0..steps {
        let chunk: Vec<&(String, String, f32)> = (0..8).map(|j| &train[(step * 8 + j) % train.len()]).collect();
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(q, d, _)| r.encode(q, d, 128).unwrap()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let labels: Vec<f32> = chunk.iter().map(|c| c.2).collect();
        let (loss, mut grads) =
            r.model.micro_step(&r.batch(&refs).unwrap(), &labels, &[1.0 / 8.0; 8], &lora, Some(&mut dropout)).unwrap();
        clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.step(&grads, sched.lr_at(step)).unwrap();
        losses.push(loss);
    }
    let first: f32 = losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = losses[steps - 20..].iter().sum::<f32>() / 20.0;
    let after = pairwise_accuracy(&r, &lora, &dev);
    eprintln!("loss {first} -> {last}, accuracy {before} -> {after}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(after >= 0.9 && after > before + 0.2, "held-out pairwise accuracy {before} -> {after}");
}

/// Scoring several documents of one query computes the shared prompt prefix once: the same
/// scores as scoring each prompt whole, within 1e-5, with and without LoRA, across batch
/// boundaries and with documents cut to max_length.
#[test]
fn a_shared_prefix_scores_as_the_whole_prompt() {
    let r = Reranker::load(fixture().to_str().unwrap(), &Device::Cpu).unwrap();
    let lora = LoraSet::load(&fixture().join("peft_adapter"), &r.model.cfg, &Device::Cpu).unwrap();
    let q = "how do tides work";
    let docs: Vec<String> = (0..23)
        .map(|i| format!("Document {i}: {}", "tides rise and fall with the moon, twice a day. ".repeat(1 + i % 7)))
        .collect();
    let pairs: Vec<(&str, &str)> = docs.iter().map(|d| (q, d.as_str())).collect();
    let max_length = 160;
    let prefix: usize = {
        let a = r.encode(q, &docs[0], max_length).unwrap();
        let b = r.encode(q, &docs[1], max_length).unwrap();
        a.iter().zip(&b).take_while(|(x, y)| x == y).count()
    };
    assert!(prefix >= rerankd::model::reranker::MIN_SHARED_PREFIX, "the template and query are shared: {prefix}");
    for lo in [None, Some(&lora)] {
        let shared = r.score_pairs(&pairs, max_length, 8, lo).unwrap();
        let mut max = 0f32;
        for (i, (q, d)) in pairs.iter().enumerate() {
            let ids = r.encode(q, d, max_length).unwrap();
            let whole = r.score_ids(&[&ids], lo).unwrap()[0];
            max = max.max((whole.score - shared[i].score).abs());
            assert!((whole.yes_logit - shared[i].yes_logit).abs() < 1e-4, "doc {i}");
        }
        assert!(max < 1e-5, "max |score difference| {max}");
        eprintln!("shared prefix of {prefix} tokens, lora {}: max |score difference| {max:e}", lo.is_some());
    }
}

/// A query's prompt prefix built on the template and instruction of another query's cache (and
/// the same query again, taken whole) scores exactly as the whole prompts; so does `score_pairs`
/// over several queries, which reuses each query's template part for the next.
#[test]
fn a_prefix_reusing_another_querys_template_scores_as_the_whole_prompt() {
    let r = Reranker::load(fixture().to_str().unwrap(), &Device::Cpu).unwrap();
    let lora = LoraSet::load(&fixture().join("peft_adapter"), &r.model.cfg, &Device::Cpu).unwrap();
    let docs: Vec<String> =
        (0..5).map(|i| format!("Document {i}: {}", "the moon pulls the sea. ".repeat(1 + i))).collect();
    let queries = ["how do tides work", "what makes the sea rise", "how do tides work"];
    let max_length = 160;
    let prompts = |q: &str| -> Vec<Vec<u32>> { docs.iter().map(|d| r.encode(q, d, max_length).unwrap()).collect() };
    for lo in [None, Some(&lora)] {
        let mut earlier: Option<rerankd::model::qwen3::PrefixCache> = None;
        for (n, q) in queries.iter().enumerate() {
            let ids = prompts(q);
            let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            let p = rerankd::model::reranker::shared_prefix(&seqs).unwrap();
            let cache = r.prefix_cache_reusing(earlier.as_ref(), &ids[0][..p], lo).unwrap();
            match n {
                0 => assert_eq!(cache.reused, 0),
                1 => assert!(
                    cache.reused >= rerankd::model::reranker::MIN_SHARED_PREFIX && cache.reused < p,
                    "the template is reused, the query computed: {} of {p}",
                    cache.reused
                ),
                _ => assert!(cache.reused > 0 && cache.reused <= p),
            }
            let tails: Vec<&[u32]> = seqs.iter().map(|s| &s[p..]).collect();
            for (s, whole) in r.score_after(&cache, &tails, lo).unwrap().iter().zip(&seqs) {
                let want = r.score_ids(&[whole], lo).unwrap()[0];
                assert!((s.score - want.score).abs() < 1e-5, "query {n}: {} vs {}", s.score, want.score);
            }
            earlier = Some(cache);
        }
        let pairs: Vec<(&str, &str)> =
            queries.iter().flat_map(|q| docs.iter().map(move |d| (*q, d.as_str()))).collect();
        for ((q, d), s) in pairs.iter().zip(r.score_pairs(&pairs, max_length, 4, lo).unwrap()) {
            let want = r.score_ids(&[&r.encode(q, d, max_length).unwrap()], lo).unwrap()[0];
            assert!((s.score - want.score).abs() < 1e-5, "score_pairs {q}: {} vs {}", s.score, want.score);
        }
    }
}
