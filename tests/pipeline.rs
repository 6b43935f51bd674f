//! The learning pipeline end to end through the daemon with the tiny fixture model: feedback ->
//! triplets -> training -> listwise evaluation -> promotion -> scoring, then a worse run that is
//! not promoted, a manual promotion and a rollback.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_rerankd");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rerankd(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("--root").arg(root).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Drops a job and runs the daemon until idle; returns the run id.
fn run_job(root: &Path, name: &str, job: &Value) -> String {
    let tmp = root.join("spool/tmp").join(name);
    std::fs::write(&tmp, job.to_string()).unwrap();
    std::fs::rename(&tmp, root.join("spool").join(name)).unwrap();
    let out = rerankd(root, &["daemon", "--until-idle"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let receipt: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("spool/accepted").join(name)).unwrap()).unwrap();
    receipt["run_id"].as_str().unwrap().to_string()
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn events(root: &Path, run: &str) -> Vec<Value> {
    std::fs::read_to_string(root.join("runs").join(run).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn current(root: &Path) -> String {
    std::fs::read_link(root.join("models/demo/current")).unwrap().file_name().unwrap().to_string_lossy().into_owned()
}

fn job(lr: f64, epochs: u64) -> Value {
    let mut j: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("examples/demo/job.json")).unwrap()).unwrap();
    j["model"] = repo().join("tests/fixtures/tiny-qwen3").display().to_string().into();
    j["train"]["lr"] = lr.into();
    j["train"]["epochs"] = epochs.into();
    j
}

#[test]
fn feedback_to_promotion_then_a_worse_run_is_not_promoted_and_rollback_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let home = root.join("corpora/demo");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(root.join("spool/tmp")).unwrap();
    std::fs::copy(repo().join("examples/demo/documents.jsonl"), home.join("documents.jsonl")).unwrap();
    // The shipped feedback, plus a query far longer than max_length: it must train, truncated.
    let mut fb = std::fs::read_to_string(repo().join("examples/demo/feedback.jsonl")).unwrap();
    let long_q = "please explain in great detail how espresso machines work ".repeat(40);
    fb.push_str(&json!({"event_id": "long", "query": long_q, "shown": ["espresso/ad", "espresso/guide"]}).to_string());
    fb.push('\n');
    fb.push_str(&json!({"event_id": "long", "signal": "click", "doc_id": "espresso/guide"}).to_string());
    fb.push('\n');
    std::fs::write(home.join("feedback.jsonl"), fb).unwrap();

    // Run 1: learns, beats the base model on dev, is promoted.
    let r1 = run_job(&root, "good.json", &job(1e-2, 4));
    let st = read(&root.join("runs").join(&r1).join("status.json"));
    assert_eq!(st["state"], "completed", "{st}");
    let ev = events(&root, &r1);
    assert_eq!(ev[0]["message"], "primary metric locked: ndcg@10");
    let eval = read(&root.join("runs").join(&r1).join("eval.json"));
    let (base, cand) = (
        eval["baseline"]["metrics"]["ndcg@10"].as_f64().unwrap(),
        eval["candidate"]["metrics"]["ndcg@10"].as_f64().unwrap(),
    );
    assert!(cand > base, "candidate {cand} vs baseline {base}");
    assert_eq!(eval["baseline"]["what"], "base model");
    assert!(ev.iter().any(|e| e["type"] == "eval" && e["which"] == "epoch"));
    let promote = ev.iter().find(|e| e["type"] == "promote").unwrap();
    assert_eq!(promote["promoted"], true, "{promote}");
    assert_eq!(current(&root), r1);
    let watch = rerankd(&root, &["watch", &r1]);
    assert!(watch.status.success());
    let shown = String::from_utf8_lossy(&watch.stdout);
    assert!(shown.contains("promoted: true") && shown.contains("ETA") && shown.ends_with("completed\n"), "{shown}");
    for why in ["signal for an unknown event_id", "no event_id"] {
        assert!(eval["skipped"][why].as_u64().unwrap_or(0) >= 1, "skipped events are counted: {}", eval["skipped"]);
    }

    // No query on both sides of the split.
    let mut sides: std::collections::HashMap<String, String> = Default::default();
    for l in std::fs::read_to_string(root.join("runs").join(&r1).join("triplets.jsonl")).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let q = v["query"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        let s = v["split"].as_str().unwrap().to_string();
        assert_eq!(sides.entry(q.clone()).or_insert(s.clone()), &s, "query {q} on both sides");
    }
    assert!(sides.values().any(|s| s == "dev") && sides.values().any(|s| s == "train"));

    // The promoted adapter scores identically in `rerankd score` and in evaluation.
    let list = &eval["lists"][0];
    let docs = read_docs(&home.join("documents.jsonl"));
    let mut jsonl = String::new();
    for id in list["ids"].as_array().unwrap() {
        let id = id.as_str().unwrap();
        jsonl.push_str(&json!({"id": id, "text": docs[id]}).to_string());
        jsonl.push('\n');
    }
    let docs_file = tmp.path().join("list.jsonl");
    std::fs::write(&docs_file, jsonl).unwrap();
    let out = rerankd(
        &root,
        &[
            "score",
            "--corpus",
            "demo",
            "--query",
            list["query"].as_str().unwrap(),
            "--docs",
            docs_file.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, s) in scored.iter().enumerate() {
        let want = list["scores"][i].as_f64().unwrap();
        assert!((s["score"].as_f64().unwrap() - want).abs() < 1e-6, "doc {i}: {} vs {want}", s["score"]);
        assert_eq!(s["id"], list["ids"][i]);
    }
    // A query longer than max_length scores too.
    let out =
        rerankd(&root, &["score", "--corpus", "demo", "--query", &long_q, "--doc", "Guide to espresso.", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Run 2: barely trained, so worse than the promoted adapter on its dev lists: not promoted.
    let r2 = run_job(&root, "worse.json", &job(1e-7, 1));
    let ev2 = events(&root, &r2);
    let p2 = ev2.iter().find(|e| e["type"] == "promote").unwrap();
    assert_eq!(p2["promoted"], false, "{p2}");
    let eval2 = read(&root.join("runs").join(&r2).join("eval.json"));
    assert!(eval2["baseline"]["what"].as_str().unwrap().contains(&r1), "{}", eval2["baseline"]);
    assert_eq!(current(&root), r1);

    // By hand: promote run 2, then roll back to run 1.
    let out = rerankd(&root, &["promote", &r2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(current(&root), r2);
    let out = rerankd(&root, &["rollback", "demo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(current(&root), r1);
    let history: Vec<Value> = std::fs::read_to_string(root.join("models/demo/promotions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hows: Vec<&str> = history.iter().map(|e| e["how"].as_str().unwrap()).collect();
    assert_eq!(hows, ["auto", "manual", "rollback"]);
    let out = rerankd(&root, &["rollback", "demo"]);
    assert!(!out.status.success(), "nothing before the first promotion");
}

fn read_docs(p: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn fewer_than_five_queries_trains_but_if_improves_does_not_promote_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("spool/tmp")).unwrap();
    let home = root.join("corpora/small");
    std::fs::create_dir_all(&home).unwrap();
    let rows: String = ["alpha", "beta", "gamma"]
        .iter()
        .map(|w| json!({"query": w, "positive": format!("{w} facts"), "negatives": ["noise"]}).to_string() + "\n")
        .collect();
    std::fs::write(home.join("t.jsonl"), rows).unwrap();
    let job = json!({"corpus": "small", "model": repo().join("tests/fixtures/tiny-qwen3"), "data": {"triplets": "t.jsonl"},
                     "train": {"epochs": 1, "batch_size": 2, "max_length": 128}, "device": "cpu"});
    let run = run_job(&root, "small.json", &job);
    assert_eq!(read(&root.join("runs").join(&run).join("status.json"))["state"], "completed");
    let ev = events(&root, &run);
    let p = ev.iter().find(|e| e["type"] == "promote").unwrap();
    assert_eq!(p["promoted"], false);
    assert!(p["reason"].as_str().unwrap().contains("fewer than 5"), "{p}");
    assert!(ev.iter().any(|e| e["type"] == "log" && e["message"].as_str().unwrap_or("").contains("fewer than 5")));
    assert!(!root.join("models/small/current").exists());
}
