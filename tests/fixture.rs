//! The engine against Hugging Face transformers + peft on the tiny Qwen3 fixture
//! (tests/fixtures/tiny-qwen3, see its README): tokens, logits, scores, loss and every LoRA gradient.
//!
//! `RERANKD_TEST_DEVICE=cuda` (or `metal`) runs them on that device, in a build with its feature
//! (`benches/gpu.sh`); the default is the CPU.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rerankd::model::lora::{LoraConfig, LoraSet, Target};
use rerankd::model::{PairLogits, Reranker};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3")
}

struct Pair {
    query: String,
    document: String,
    label: f32,
    ids: Vec<u32>,
    base: [f32; 3],
    lora: [f32; 3],
}

fn reference() -> (Value, Vec<Pair>) {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let f = |p: &Value, k: &str| p[k].as_f64().unwrap() as f32;
    let pairs = v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pair {
            query: p["query"].as_str().unwrap().into(),
            document: p["document"].as_str().unwrap().into(),
            label: f(p, "label"),
            ids: p["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            base: [f(p, "base_yes_logit"), f(p, "base_no_logit"), f(p, "base_score")],
            lora: [f(p, "lora_yes_logit"), f(p, "lora_no_logit"), f(p, "lora_score")],
        })
        .collect();
    (v, pairs)
}

/// The device under test: the CPU unless `RERANKD_TEST_DEVICE` names another.
fn device() -> Device {
    match std::env::var("RERANKD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("RERANKD_TEST_DEVICE=cuda: no CUDA device in this build"),
        Ok("metal") => Device::new_metal(0).expect("RERANKD_TEST_DEVICE=metal: no Metal device in this build"),
        _ => Device::Cpu,
    }
}

fn model() -> Reranker {
    let mut r = Reranker::load(fixture().to_str().unwrap(), &device()).unwrap();
    let (v, _) = reference();
    r.instruction = v["instruction"].as_str().unwrap().into();
    r
}

fn fixture_lora(r: &Reranker) -> LoraSet {
    let cfg = LoraConfig::new(4, 8.0, 0.0, &Target::ALL);
    LoraSet::load_tensors(&cfg, &fixture().join("lora_init.safetensors"), &r.model.cfg, &device()).unwrap()
}

fn assert_close(got: &PairLogits, want: &[f32; 3], what: &str) {
    let d = [(got.yes_logit - want[0]).abs(), (got.no_logit - want[1]).abs(), (got.score - want[2]).abs()];
    assert!(d.iter().all(|&d| d < 1e-4), "{what}: got {got:?}, want {want:?} (diff {d:?})");
}

fn check_scores(r: &Reranker, lora: Option<&LoraSet>, pick: fn(&Pair) -> [f32; 3]) {
    let (_, pairs) = reference();
    for (i, p) in pairs.iter().enumerate() {
        let one = r.score_ids(&[p.ids.as_slice()], lora).unwrap();
        assert_close(&one[0], &pick(p), &format!("pair {i} alone"));
    }
    // One padded batch, and the reversed order, must agree with the singletons.
    let seqs: Vec<&[u32]> = pairs.iter().map(|p| p.ids.as_slice()).collect();
    for (i, s) in r.score_ids(&seqs, lora).unwrap().iter().enumerate() {
        assert_close(s, &pick(&pairs[i]), &format!("pair {i} in a padded batch"));
    }
    let rev: Vec<&[u32]> = seqs.iter().rev().copied().collect();
    for (j, s) in r.score_ids(&rev, lora).unwrap().iter().enumerate() {
        assert_close(s, &pick(&pairs[pairs.len() - 1 - j]), &format!("pair {j} in a reversed batch"));
    }
}

#[test]
fn prompt_tokens_match_the_reference() {
    let r = model();
    let (_, pairs) = reference();
    let lens: Vec<usize> = pairs.iter().map(|p| p.ids.len()).collect();
    assert!(lens.iter().any(|&l| l != lens[0]), "the fixture should have pairs of different lengths");
    for p in &pairs {
        assert_eq!(r.encode(&p.query, &p.document, 100_000).unwrap(), p.ids, "tokens of {:?}", p.query);
    }
}

#[test]
fn base_scores_match_one_by_one_and_batched() {
    check_scores(&model(), None, |p| p.base);
}

#[test]
fn lora_scores_match_one_by_one_and_batched() {
    let r = model();
    check_scores(&r, Some(&fixture_lora(&r)), |p| p.lora);
}

#[test]
fn peft_adapter_directory_loads_and_scores_the_same() {
    let r = model();
    let lora = LoraSet::load(&fixture().join("peft_adapter"), &r.model.cfg, &device()).unwrap();
    assert_eq!(lora.cfg.r, 4);
    assert_eq!(lora.cfg.targets.len(), 7);
    check_scores(&r, Some(&lora), |p| p.lora);
}

#[test]
fn head_output_is_batch_by_two() {
    let r = model();
    let (_, pairs) = reference();
    let seqs: Vec<&[u32]> = pairs.iter().map(|p| p.ids.as_slice()).collect();
    let b = r.batch(&seqs).unwrap();
    assert_eq!(r.logits(&b, None).unwrap().dims(), &[pairs.len(), 2]);
}

fn reference_grads(r: &Reranker, lora: &LoraSet) -> Vec<Tensor> {
    let want = candle_core::safetensors::load(fixture().join("lora_grads.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(want.len(), lora.named().len(), "reference has a gradient for every LoRA tensor");
    let _ = r;
    lora.named().iter().map(|(n, _)| want.get(n).unwrap_or_else(|| panic!("no reference grad {n}")).clone()).collect()
}

fn assert_grads(got: &[Tensor], want: &[Tensor], names: &[String]) {
    for ((g, w), n) in got.iter().zip(want).zip(names) {
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g.len(), w.len(), "{n}");
        assert!(w.iter().any(|&x| x != 0.0), "reference gradient of {n} is zero");
        for (a, b) in g.iter().zip(&w) {
            let ok = (a - b).abs() <= 1e-4 || (a - b).abs() <= 1e-3 * b.abs();
            assert!(ok, "{n}: got {a}, want {b}");
        }
    }
}

#[test]
fn loss_and_every_lora_gradient_match_the_reference() {
    let r = model();
    let (v, pairs) = reference();
    let lora = fixture_lora(&r);
    let names: Vec<String> = lora.named().into_iter().map(|(n, _)| n).collect();
    let want = reference_grads(&r, &lora);
    let seqs: Vec<&[u32]> = pairs.iter().map(|p| p.ids.as_slice()).collect();
    let labels: Vec<f32> = pairs.iter().map(|p| p.label).collect();
    let n = pairs.len() as f32;

    // One padded batch.
    let b = r.batch(&seqs).unwrap();
    let (loss, grads) = r.model.micro_step(&b, &labels, &vec![1.0 / n; pairs.len()], &lora, None).unwrap();
    let want_loss = v["lora_mean_loss"].as_f64().unwrap() as f32;
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs {want_loss}");
    assert_grads(&grads, &want, &names);

    // The same as four micro-batches of one, accumulated.
    let mut acc = rerankd::train::optim::Accumulator::default();
    let mut total = 0.0;
    for (s, y) in seqs.iter().zip(&labels) {
        let b = r.batch(&[s]).unwrap();
        let (l, g) = r.model.micro_step(&b, &[*y], &[1.0 / n], &lora, None).unwrap();
        total += l;
        acc.add(g).unwrap();
    }
    assert!((total - want_loss).abs() < 1e-5, "accumulated loss {total} vs {want_loss}");
    assert_grads(&acc.take().unwrap(), &want, &names);
}

/// The kernel path chosen for this process (`RERANKD_KERNEL`, which `.ci/run` sets to each path
/// the CPU has in turn, or the best this CPU has) is the one the fixture's projections run on, so
/// the checks above hold for that path; a path asked for by name is the one taken. Where it is AMX,
/// products went through the tiles (with `RERANKD_AMX=all`, LoRA's and the head's too).
#[test]
fn the_chosen_kernel_path_carries_the_fixture() {
    use rerankd::model::cpu::{self, Kernel};
    let chosen = cpu::chosen();
    if let Ok(asked) = std::env::var("RERANKD_KERNEL")
        && !asked.is_empty()
        && asked != "auto"
    {
        assert_eq!(chosen.name(), asked, "RERANKD_KERNEL={asked} was not the path taken");
    }
    let r = model();
    assert_eq!(r.model.weights_kernel(), Some(chosen), "the fixture's projections run on another path");
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if chosen == Kernel::Amx {
        use rerankd::model::amx;
        let before = amx::products_run();
        check_scores(&r, None, |p| p.base);
        assert!(amx::products_run() > before, "AMX is on, yet no product went through it");
    }
    eprintln!("fixture: kernel path {} ({})", chosen.name(), cpu::describe());
}

/// `--precision bf16` (opt-in, scoring only) against the default f32 on the fixture, through the
/// real binary (the precision is a process's setting): the fixture's reference documents for one
/// of its queries, scored both ways. The scores move by little and the ranking is kept (nDCG@10
/// of the bf16 order against the f32 order, Kendall's tau, the top document). The numbers are
/// printed for docs/performance.md. A CPU without AVX512_BF16 refuses the option: reported as
/// skipped.
#[test]
fn bf16_precision_keeps_the_fixtures_ranking() {
    use rerankd::train::metrics::{agreement_ndcg10, kendall_tau};
    let (_, pairs) = reference();
    let query = pairs[0].query.clone();
    // Twenty documents: the reference's documents and queries, and sentences of their words.
    let mut docs: Vec<String> = pairs.iter().flat_map(|p| [p.document.clone(), p.query.clone()]).collect();
    let words: Vec<String> = docs.join(" ").split_whitespace().map(str::to_string).collect();
    for i in 0..20 {
        docs.push((0..8 + i % 5).map(|j| words[(7 * i + 3 * j) % words.len()].as_str()).collect::<Vec<_>>().join(" "));
    }
    docs.sort();
    docs.dedup();
    docs.truncate(20);
    let run = |precision: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rerankd"));
        cmd.args(["--json", "score", "--model", fixture().to_str().unwrap(), "--query", &query]);
        cmd.args(["--precision", precision]);
        for d in &docs {
            cmd.args(["--doc", d]);
        }
        cmd.output().unwrap()
    };
    let scores = |out: &std::process::Output| -> Vec<f64> {
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["score"].as_f64().unwrap()).collect()
    };
    let exact = run("f32");
    assert!(exact.status.success(), "{}", String::from_utf8_lossy(&exact.stderr));
    let reduced = run("bf16");
    if rerankd::model::cpu::chosen() == rerankd::model::cpu::Kernel::F32 {
        assert!(!reduced.status.success(), "--precision bf16 was accepted on the f32 path");
        let why = "RERANKD_KERNEL=f32 has no bf16 products (the option is refused)";
        rerankd::testhooks::skipped("fixture::bf16_precision_keeps_the_fixtures_ranking", "a packed kernel path", why);
        return;
    }
    if let Some(why) = rerankd::model::cpu::Kernel::Avx512Bf16.unavailable() {
        assert!(!reduced.status.success(), "--precision bf16 was accepted without AVX512_BF16");
        rerankd::testhooks::skipped("fixture::bf16_precision_keeps_the_fixtures_ranking", "avx512bf16", &why);
        return;
    }
    assert!(reduced.status.success(), "{}", String::from_utf8_lossy(&reduced.stderr));
    let (f, b) = (scores(&exact), scores(&reduced));
    assert_eq!(f.len(), docs.len());
    let diff = f.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let (ndcg, tau) = (agreement_ndcg10(&f, &b), kendall_tau(&f, &b));
    eprintln!(
        "fixture, bf16 against f32: {} documents, max |score diff| {diff:.2e}, nDCG@10 {ndcg:.4}, Kendall tau {tau:.4}",
        f.len()
    );
    assert!(diff < 0.02, "bf16 moved a score by {diff}");
    assert!(ndcg > 0.98 && tau > 0.9, "bf16 changed the ranking: nDCG@10 {ndcg}, tau {tau}");
}
