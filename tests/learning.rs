//! Learning you can trust, end to end with the fixture model and the real daemon: hard negatives
//! mined by the baseline beat training without them, and a candidate that is better on new
//! feedback but significantly worse on an earlier promotion's held-out lists is not promoted.
//! (The decision rules themselves are tested on constructed values in `train::promotion`, the
//! statistics in `train::significance`.)

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

const TOPICS: [&str; 12] = [
    "espresso",
    "tides",
    "glaciers",
    "volcanoes",
    "bees",
    "vaccines",
    "inflation",
    "sourdough",
    "photosynthesis",
    "comets",
    "earthquakes",
    "rainbows",
];

fn write_lines(path: &std::path::Path, lines: impl IntoIterator<Item = Value>) {
    let text: String = lines.into_iter().map(|v| v.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn run(root: &Root, name: &str, job: &Value) -> String {
    let id = root.submit(name, job);
    let st = wait_state(root, &id, &["completed", "failed", "cancelled"], Duration::from_secs(180));
    assert_eq!(st["state"], "completed", "{st}");
    id
}

fn eval(root: &Root, id: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root.dir.join("runs").join(id).join("eval.json")).unwrap()).unwrap()
}

fn promote_event(root: &Root, id: &str) -> Value {
    root.events(id).into_iter().find(|e| e["type"] == "promote").expect("a promote event")
}

/// Each topic has a guide (the positive of its queries), ten near-misses that copy the guide and
/// add a spam tail (lexically similar, wrong), and the corpus has 60 unrelated fillers. The
/// triplets give each query its guide and two fillers as negatives, so without mining no
/// near-miss is ever a training negative; dev lists draw random corpus documents, mostly
/// near-misses, so a model that cannot tell them from guides ranks badly.
#[test]
fn hard_negatives_mined_by_the_baseline_are_the_near_misses_and_beat_training_without_them() {
    let root = Root::new("");
    let home = root.dir.join("corpora/hn");
    std::fs::create_dir_all(&home).unwrap();
    let guide = |t: &str| format!("Guide to {t}. How {t} works, explained step by step with examples and diagrams.");
    let mut docs = Vec::new();
    for t in TOPICS {
        docs.push(json!({"id": format!("{t}/guide"), "text": guide(t)}));
        for v in 0..10 {
            let text = format!("{} BUY NOW!!! Limited offer {v}, click here!!!", guide(t));
            docs.push(json!({"id": format!("{t}/spam{v}"), "text": text}));
        }
    }
    let fillers = [
        "Weather report for day {i}: sunny with light wind and mild temperatures.",
        "Recipe number {i}: mix flour, water and salt, then bake for forty minutes.",
        "Match report {i}: the home team won after a late goal in the second half.",
    ];
    for i in 0..60 {
        docs.push(json!({"id": format!("filler/{i}"), "text": fillers[i % 3].replace("{i}", &i.to_string())}));
    }
    write_lines(&home.join("documents.jsonl"), docs);
    let phrasings = ["what is {t}", "explain {t}", "how does {t} work", "{t} explained", "tell me about {t}"];
    let mut rows = Vec::new();
    for t in TOPICS {
        for p in phrasings {
            let k = rows.len();
            let negatives = [format!("filler/{}", (2 * k) % 60), format!("filler/{}", (2 * k + 1) % 60)];
            rows.push(json!({"query": p.replace("{t}", t), "positive": format!("{t}/guide"), "negatives": negatives}));
        }
    }
    write_lines(&home.join("triplets.jsonl"), rows);
    let job = json!({"corpus": "hn", "model": fixture_model(),
        "data": {"triplets": "triplets.jsonl", "documents": "documents.jsonl"},
        "train": {"epochs": 4, "batch_size": 8, "max_length": 96, "lr": 0.01, "negative_ratio": 4, "seed": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "eval": {"dev_fraction": 0.25, "list_size": 20}, "device": "cpu"});
    let _d = DaemonGuard(root.daemon());

    // Without mining; promoted, so it is the baseline that mines for the next run.
    let mut plain = job.clone();
    plain["promote"] = "always".into();
    let r1 = run(&root, "plain.json", &plain);
    // The same job with mining (not promoted: the comparison is between the two candidates).
    let mut mined = job.clone();
    mined["promote"] = "never".into();
    mined["train"]["hard_negatives"] = json!({"from": "baseline", "top_k": 3, "skip_top": 0});
    let r2 = run(&root, "mined.json", &mined);

    let (e1, e2) = (eval(&root, &r1), eval(&root, &r2));
    assert_eq!(e1["dev_queries"], e2["dev_queries"], "the same split");
    let ndcg = |e: &Value| e["candidate"]["metrics"]["ndcg@10"].as_f64().unwrap();
    let (without, with) = (ndcg(&e1), ndcg(&e2));
    eprintln!("dev ndcg@10: trained without hard negatives {without:.4}, with them {with:.4}");
    assert!(with > without + 0.1, "with hard negatives {with:.4} vs without {without:.4}");

    // What was mined: recorded per document in triplets.jsonl, near-misses for the most part.
    let triplets = std::fs::read_to_string(root.dir.join("runs").join(&r2).join("triplets.jsonl")).unwrap();
    let (mut hard, mut near_miss, mut train_rows) = (0, 0, 0);
    for l in triplets.lines() {
        let row: Value = serde_json::from_str(l).unwrap();
        let negs = row["negatives"].as_array().unwrap();
        let mined: Vec<&str> =
            negs.iter().filter(|n| n["source"] == "hard").map(|n| n["id"].as_str().unwrap()).collect();
        if row["split"] == "dev" {
            assert!(mined.is_empty(), "dev queries are not mined: {row}");
            continue;
        }
        train_rows += 1;
        assert_eq!(mined.len(), 3, "{row}");
        // After the explicit (given) negatives.
        assert!(negs[..2].iter().all(|n| n["source"] == "given"), "{row}");
        hard += mined.len();
        near_miss += mined.iter().filter(|id| id.contains("/spam")).count();
    }
    eprintln!("mined {hard} hard negatives for {train_rows} training queries, {near_miss} of them near-misses");
    assert!(near_miss * 10 >= hard * 6, "{near_miss} of {hard} mined are near-misses");
    // The cost is stated, and the negatives used are counted by source.
    let logs: Vec<String> = root
        .events(&r2)
        .iter()
        .filter(|e| e["type"] == "log")
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    let cost = logs.iter().find(|m| m.starts_with("hard negatives: the promoted adapter of")).expect("cost line");
    assert!(cost.contains(&format!("{train_rows} training queries x 100 candidates")), "{cost}");
    assert!(logs.iter().any(|m| m.contains(&format!("hard negatives: {hard} mined for {train_rows} queries"))));
    assert!(logs.iter().any(|m| m.contains("negatives by source:") && m.contains(" hard")), "{logs:?}");
}

/// The demo's documents: each topic's guide, ad and forum post.
fn demo_corpus(root: &Root, corpus: &str) -> std::path::PathBuf {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let home = root.dir.join("corpora").join(corpus);
    std::fs::create_dir_all(&home).unwrap();
    for f in ["documents.jsonl", "feedback.jsonl"] {
        std::fs::copy(repo.join("examples/demo").join(f), home.join(f)).unwrap();
    }
    home
}

#[test]
fn better_on_new_feedback_but_significantly_worse_on_held_out_lists_is_not_promoted() {
    let root = Root::new("");
    let home = demo_corpus(&root, "demo");
    // New feedback that wants the opposite of the old: the ads, never the guides. The topics
    // are the demo corpus's (`<topic>/guide`, `<topic>/ad`, `<topic>/forum`).
    let docs = std::fs::read_to_string(home.join("documents.jsonl")).unwrap();
    let topics: Vec<String> = docs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["id"].as_str()?.strip_suffix("/guide").map(String::from))
        .collect();
    assert_eq!(topics.len(), 12);
    let mut fb = Vec::new();
    for t in &topics {
        for p in ["cheap {t} deals", "buy {t} online", "{t} discount offer", "{t} sale today", "best {t} price"] {
            let id = format!("b{}", fb.len());
            let shown = [format!("{t}/guide"), format!("{t}/forum"), format!("{t}/ad")];
            fb.push(json!({"event_id": id, "query": p.replace("{t}", &t.replace('-', " ")), "shown": shown}));
            fb.push(json!({"event_id": id, "signal": "click", "doc_id": format!("{t}/ad")}));
            fb.push(json!({"event_id": id, "signal": "thumbsdown", "doc_id": format!("{t}/guide")}));
        }
    }
    write_lines(&home.join("feedback_b.jsonl"), fb);
    let job = |feedback: &str| {
        json!({"corpus": "demo", "model": fixture_model(),
            "data": {"feedback": feedback, "documents": "documents.jsonl"},
            "train": {"epochs": 4, "batch_size": 8, "max_length": 160, "lr": 0.01, "negative_ratio": 4, "seed": 0},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "eval": {"dev_fraction": 0.25}, "device": "cpu"})
    };
    let _d = DaemonGuard(root.daemon());
    // Run A learns the guides and is promoted (by the default rule): its dev lists are frozen.
    let a = run(&root, "a.json", &job("feedback.jsonl"));
    let pa = promote_event(&root, &a);
    assert_eq!(pa["promoted"], true, "{pa}");
    assert_eq!(pa["policy"], "if_significant");
    let frozen = root.dir.join("models/demo/heldout").join(format!("{a}.jsonl"));
    let a_dev = eval(&root, &a)["dev_queries"].as_u64().unwrap();
    assert_eq!(std::fs::read_to_string(&frozen).unwrap().lines().count() as u64, a_dev);

    // Run B learns the ads: far better than A on its own dev lists, far worse on A's.
    let b = run(&root, "b.json", &job("feedback_b.jsonl"));
    let pb = promote_event(&root, &b);
    eprintln!("run B: {}", pb["reason"]);
    assert_eq!(pb["promoted"], false, "{pb}");
    assert!(pb["dev"]["ci"][0].as_f64().unwrap() > 0.0, "B is significantly better on its dev lists: {pb}");
    assert!(pb["heldout"]["ci"][1].as_f64().unwrap() < 0.0, "and significantly worse on A's: {pb}");
    assert_eq!(pb["heldout"]["queries"].as_u64(), Some(a_dev), "every held-out query of A evaluated");
    let reason = pb["reason"].as_str().unwrap();
    assert!(reason.starts_with("not promoted: better on new feedback (+"), "{reason}");
    assert!(reason.contains("significantly worse on the held-out lists of earlier promotions (-"), "{reason}");
    let evb = eval(&root, &b);
    assert_eq!(evb["heldout"]["queries"].as_u64(), Some(a_dev));
    assert!(evb["heldout"]["candidate"]["ndcg@10"].as_f64() < evb["heldout"]["baseline"]["ndcg@10"].as_f64());
    let logs: Vec<String> = root.events(&b).iter().filter_map(|e| e["message"].as_str().map(str::to_string)).collect();
    assert!(logs.iter().any(|m| m.starts_with(&format!("held-out lists: {a_dev} queries from 1 earlier promotion"))));
    let cur = std::fs::read_link(root.dir.join("models/demo/current")).unwrap();
    assert!(cur.to_string_lossy().contains(&a), "A still serves: {}", cur.display());
}
