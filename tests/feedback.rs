//! The feedback loop through real HTTP on loopback with the fixture model: capture, signals,
//! retraining by policy with no manual step, concurrent appends against a run's snapshot, bad
//! feedback, and kill -9 of serve in the middle of appends.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

fn post(a: &ureq::Agent, url: &str, body: &[u8]) -> (u16, Value) {
    let mut r = a.post(url).header("Content-Type", "application/json").send(body).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn post_json(a: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    post(a, url, body.to_string().as_bytes())
}

/// The demo corpus's documents: id -> text.
fn demo_documents() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo/documents.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string())
        })
        .collect()
}

fn topics(docs: &[(String, String)]) -> Vec<String> {
    let mut t: Vec<String> = docs.iter().map(|(id, _)| id.split('/').next().unwrap().to_string()).collect();
    t.dedup();
    t
}

/// The candidates shown for a topic's query: its guide, ad and forum, and three documents of
/// other topics, as Cohere `{id, text}` objects.
fn candidates(docs: &[(String, String)], topic: &str, k: usize) -> Vec<Value> {
    let own = docs.iter().filter(|(id, _)| id.starts_with(&format!("{topic}/")));
    let others = docs.iter().filter(|(id, _)| !id.starts_with(&format!("{topic}/"))).skip(k * 5 % 30).take(3);
    own.chain(others).map(|(id, text)| json!({"id": id, "text": text})).collect()
}

/// nDCG@10 of a served order (binary relevance: the topic's guide).
fn ndcg(order: &[String], topic: &str) -> f64 {
    let rel = format!("{topic}/guide");
    order.iter().take(10).position(|id| *id == rel).map_or(0.0, |r| 1.0 / ((r + 2) as f64).log2())
}

/// Ranks `query` with corpus `demo` and returns (event id, adapter, ids in served order).
fn rank(a: &ureq::Agent, url: &str, query: &str, cands: &[Value]) -> (String, String, Vec<String>) {
    let (status, body) =
        post_json(a, &format!("{url}/v1/rerank"), &json!({"model": "demo", "query": query, "documents": cands}));
    assert_eq!(status, 200, "{body}");
    let order = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| cands[r["index"].as_u64().unwrap() as usize]["id"].as_str().unwrap().to_string())
        .collect();
    (body["id"].as_str().unwrap().to_string(), body["meta"]["adapter"].as_str().unwrap().to_string(), order)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: a line that is not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

#[test]
fn the_loop_closes_with_no_manual_step_and_the_served_ranking_improves() {
    let root = Root::new("rescan_s = 1\n");
    let home = root.dir.join("corpora/demo");
    std::fs::create_dir_all(&home).unwrap();
    let docs = demo_documents();
    let topics = topics(&docs);
    let train_phrasings = ["what is {}", "explain {}", "how does {} work", "{} basics"];
    let held_out_phrasings = ["tell me about {}", "{} for beginners"];
    let signals_needed = topics.len() * train_phrasings.len() * 3;
    std::fs::write(
        home.join("policy.json"),
        json!({"capture": true, "retrain_after_events": signals_needed, "min_interval_s": 0, "job": "job.json"})
            .to_string(),
    )
    .unwrap();
    let mut job: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo/job.json")).unwrap(),
    )
    .unwrap();
    job["model"] = fixture_model().into();
    job["promote"] = "always".into();
    std::fs::write(home.join("job.json"), job.to_string()).unwrap();
    let _daemon = DaemonGuard(root.daemon());
    let s = Serve::fixture(&root, &[]);
    let a = agent();

    // The held-out queries, ranked by the base model (these rankings are captured too).
    let held_out = |adapter_wanted: &str| -> f64 {
        let mut total = 0.0;
        let mut n = 0;
        for (k, t) in topics.iter().enumerate() {
            for p in held_out_phrasings {
                let (_, adapter, order) =
                    rank(&a, &s.url, &p.replace("{}", &t.replace('-', " ")), &candidates(&docs, t, k));
                assert_eq!(adapter, adapter_wanted);
                total += ndcg(&order, t);
                n += 1;
            }
        }
        total / n as f64
    };
    let before = held_out("base");

    // The scripted user: rankings of the training phrasings and a thumbs up on the guide, down
    // on the ad and the forum post.
    for (k, t) in topics.iter().enumerate() {
        for p in train_phrasings {
            let (event, _, _) = rank(&a, &s.url, &p.replace("{}", &t.replace('-', " ")), &candidates(&docs, t, k));
            for (doc, signal) in [("guide", "thumbsup"), ("ad", "thumbsdown"), ("forum", "thumbsdown")] {
                let (status, body) = post_json(
                    &a,
                    &format!("{}/v1/feedback", s.url),
                    &json!({"id": event, "signal": signal, "doc_id": format!("{t}/{doc}")}),
                );
                assert_eq!(status, 200, "{body}");
            }
        }
    }
    let written = lines(&home.join("feedback.jsonl")).len();
    let t0 = Instant::now();

    // The daemon notices and runs the corpus's job by itself.
    let run = wait_for("a run started by the policy", Duration::from_secs(60), || {
        std::fs::read_dir(root.dir.join("runs"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|r| r.starts_with("demo__"))
    });
    let st = wait_state(&root, &run, &["completed", "failed", "cancelled"], Duration::from_secs(300));
    assert_eq!(st["state"], "completed", "{st}");
    let effective: Value =
        serde_json::from_str(&std::fs::read_to_string(root.dir.join("runs").join(&run).join("job.json")).unwrap())
            .unwrap();
    assert_eq!(effective["origin"], "policy");
    let events = root.events(&run);
    let why = events.iter().find(|e| e["origin"] == "policy").expect("a log event saying why the policy started it");
    assert!(why["message"].as_str().unwrap().contains(&format!("{signals_needed} new signal events")), "{why}");
    // It mined exactly what was captured: every line written before it, and nothing else.
    let snap = events.iter().find(|e| e["type"] == "feedback_snapshot").cloned().expect("a feedback snapshot event");
    assert_eq!(snap["events"].as_u64().unwrap() as usize, written, "{snap}");
    let triplets = std::fs::read_to_string(root.dir.join("runs").join(&run).join("triplets.jsonl")).unwrap();
    assert_eq!(
        triplets.lines().count(),
        topics.len() * train_phrasings.len(),
        "one query per captured, signalled ranking"
    );
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(root.dir.join("runs").join(&run).join("eval.json")).unwrap())
            .unwrap();
    assert_eq!(eval["feedback"]["offset"], snap["offset"]);

    // serve picks the promotion up, and the held-out rankings are better.
    wait_for("serve to hot-reload the promoted adapter", Duration::from_secs(10), || {
        let (_, adapter, _) = rank(&a, &s.url, "what is bees", &candidates(&docs, "bees", 0));
        (adapter == run).then_some(())
    });
    let after = held_out(&run);
    eprintln!(
        "loop: {written} events captured; run {run} ended {:.1?} after the last signal; held-out nDCG@10 of the served order {before:.3} -> {after:.3}",
        t0.elapsed()
    );
    assert!(after > before + 0.05, "held-out nDCG@10 {before:.3} -> {after:.3}");

    // Online counts per adapter, in serve and in `status --corpus`.
    let models = a.get(format!("{}/v1/models", s.url)).call().unwrap().body_mut().read_json::<Value>().unwrap();
    let demo = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "demo").unwrap().clone();
    let base = &demo["online"]["base"];
    // (plus the rankings that waited for the reload)
    assert!(
        base["impressions"].as_u64().unwrap() as usize
            >= topics.len() * (train_phrasings.len() + held_out_phrasings.len())
    );
    assert_eq!(base["positive"].as_u64().unwrap() as usize, topics.len() * train_phrasings.len());
    assert_eq!(base["negative"].as_u64().unwrap() as usize, 2 * topics.len() * train_phrasings.len());
    assert!(demo["online"][&run]["impressions"].as_u64().unwrap() >= topics.len() as u64);
    let out = root.cli_cmd(["status", "--corpus", "demo"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("online feedback per adapter") && text.contains(&format!("{run} (current)")), "{text}");

    // No second policy run while nothing new arrives.
    std::thread::sleep(Duration::from_secs(3));
    let runs = std::fs::read_dir(root.dir.join("runs")).unwrap().count();
    assert_eq!(runs, 1, "the policy started another run without new feedback");
}

/// A captured ranking of `docs` for corpus `c`: its event id.
fn capture_one(a: &ureq::Agent, url: &str, corpus: &str, docs: &[(&str, &str)]) -> String {
    let documents: Vec<Value> = docs.iter().map(|(id, t)| json!({"id": id, "text": t})).collect();
    let (status, body) =
        post_json(a, &format!("{url}/v1/rerank"), &json!({"model": corpus, "query": "q", "documents": documents}));
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_string()
}

#[test]
fn four_writers_append_while_a_run_reads_a_consistent_snapshot() {
    let root = Root::new("");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("policy.json"), r#"{"capture": true}"#).unwrap();
    let _daemon = DaemonGuard(root.daemon());
    let s = Serve::fixture(&root, &[]);
    let docs: Vec<(String, String)> =
        (0..6).map(|i| (format!("d{i}"), format!("document number {i} about topic {i}"))).collect();
    let pairs: Vec<(&str, &str)> = docs.iter().map(|(i, t)| (i.as_str(), t.as_str())).collect();
    let event = capture_one(&agent(), &s.url, "c", &pairs);

    let sent = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, event, sent) = (format!("{}/v1/feedback", s.url), event.clone(), sent.clone());
            std::thread::spawn(move || {
                let a = agent();
                for i in 0..1250 {
                    let signal = if (i + w) % 3 == 0 { "thumbsup" } else { "thumbsdown" };
                    let (status, body) =
                        post_json(&a, &url, &json!({"id": event, "signal": signal, "index": (i + w) % 6}));
                    assert_eq!(status, 200, "{body}");
                    sent.fetch_add(1, Ordering::Relaxed);
                    // Paced, so that the run below starts while they are still appending.
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    // A run of this corpus reads its feedback while they append.
    wait_for("appends under way", Duration::from_secs(30), || (sent.load(Ordering::Relaxed) > 200).then_some(()));
    let job = json!({"corpus": "c", "model": fixture_model(), "data": {"feedback": "feedback.jsonl", "documents": "documents.jsonl"},
                     "train": {"epochs": 1, "batch_size": 4, "max_length": 128}, "device": "cpu"});
    let run = root.submit("job.json", &job);
    for w in writers {
        w.join().unwrap();
    }
    let st = wait_state(&root, &run, &["completed", "failed", "cancelled"], Duration::from_secs(120));
    let bytes = std::fs::read(home.join("feedback.jsonl")).unwrap();
    let all = lines(&home.join("feedback.jsonl"));
    assert_eq!(all.len(), 1 + 5000, "lost or extra lines");
    assert_eq!(all.iter().filter(|l| l["signal"].is_string()).count(), 5000);
    let snap = root
        .events(&run)
        .iter()
        .find(|e| e["type"] == "feedback_snapshot")
        .cloned()
        .unwrap_or_else(|| panic!("no snapshot: {st}"));
    let offset = snap["offset"].as_u64().unwrap() as usize;
    assert_eq!(bytes[offset - 1], b'\n', "the snapshot ends inside a line");
    let before = bytes[..offset].split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(snap["events"].as_u64().unwrap() as usize, before, "{snap}");
    eprintln!("snapshot at byte {offset}: {before} of {} lines; run {}", all.len(), st["state"]);
    assert!(before > 1 && before < all.len(), "the run did not read while appends went on ({before} of {})", all.len());
}

/// Capture never fails a ranking: an edited document (its id recorded with another text) is
/// recorded as a new version that signals by the client's id still reach; only the documents
/// `top_n` returned are recorded as shown; and when the files cannot be written the ranking is
/// still answered, with the failure in `meta.capture`, the `X-Rerankd-Capture` header and
/// `/metrics`.
#[test]
fn capture_never_fails_a_ranking_and_records_edits_as_versions_and_only_what_was_shown() {
    let (_root, home, s, a, _event) = serve_one_captured_ranking();
    let rerank = format!("{}/v1/rerank", s.url);
    // d1 was captured as "first text"; the knowledge base edited it since.
    let body = json!({"model": "c", "query": "q", "top_n": 1,
                      "documents": [{"id": "d3", "text": "new"}, {"id": "d1", "text": "first text, edited"}]});
    let (status, reply) = post_json(&a, &rerank, &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["meta"]["capture"]["status"], "recorded", "{reply}");
    let event = reply["id"].as_str().unwrap().to_string();
    let ev = lines(&home.join("feedback.jsonl")).into_iter().find(|l| l["event_id"] == event.as_str()).unwrap();
    let recorded: Vec<String> =
        ev["documents"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().into()).collect();
    assert_eq!(recorded[0], "d3");
    assert!(recorded[1].starts_with("d1#"), "{ev}");
    let top = reply["results"][0]["index"].as_u64().unwrap() as usize;
    assert_eq!(ev["shown"], json!([recorded[top]]), "only the returned document was shown: {ev}");
    let docs = lines(&home.join("documents.jsonl"));
    let texts: std::collections::HashMap<&str, &str> =
        docs.iter().map(|d| (d["id"].as_str().unwrap(), d["text"].as_str().unwrap())).collect();
    assert_eq!(texts.len(), docs.len(), "an id recorded twice: {docs:?}");
    assert_eq!((texts["d1"], texts[recorded[1].as_str()]), ("first text", "first text, edited"));
    // A signal by the client's own id reaches the version shown.
    let (status, r) =
        post_json(&a, &format!("{}/v1/feedback", s.url), &json!({"id": event, "signal": "click", "doc_id": "d1"}));
    assert_eq!((status, r["doc_id"].as_str()), (200, Some(recorded[1].as_str())), "{r}");
    // The feedback file cannot be written: the ranking is answered all the same.
    let fb = home.join("feedback.jsonl");
    std::fs::rename(&fb, home.join("feedback.jsonl.away")).unwrap();
    std::fs::create_dir(&fb).unwrap();
    let (status, reply) = post_json(&a, &rerank, &json!({"model": "c", "query": "q", "documents": ["a", "b"]}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["meta"]["capture"]["status"], "failed", "{reply}");
    assert!(!reply["meta"]["capture"]["error"].as_str().unwrap().is_empty());
    let r = a
        .post(format!("{}/corpora/c/rerank", s.url))
        .header("Content-Type", "application/json")
        .send(json!({"query": "q", "texts": ["a"]}).to_string())
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("x-rerankd-capture").unwrap(), "failed");
    let m = a.get(format!("{}/metrics", s.url)).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(m.lines().any(|l| l.starts_with("rerankd_capture_failures_total") && !l.ends_with(" 0")), "{m}");
}

/// The loop reacts when feedback arrives: with rescans an hour apart, the daemon drops the
/// policy's job within seconds of the signal that crosses the threshold (it watches the feedback
/// files), and not before.
#[test]
fn a_policy_is_evaluated_within_seconds_of_its_threshold_being_crossed() {
    let root = Root::new("rescan_s = 3600\n");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("policy.json"),
        json!({"capture": true, "retrain_after_events": 3, "min_interval_s": 0, "job": "job.json"}).to_string(),
    )
    .unwrap();
    let job = json!({"model": fixture_model(), "data": {"feedback": "feedback.jsonl", "documents": "documents.jsonl"},
                     "train": {"epochs": 1, "batch_size": 2, "max_length": 64}, "device": "cpu"});
    std::fs::write(home.join("job.json"), job.to_string()).unwrap();
    let _daemon = DaemonGuard(root.daemon());
    let s = Serve::fixture(&root, &[]);
    let a = agent();
    let event = capture_one(&a, &s.url, "c", &[("d1", "first text"), ("d2", "second text")]);
    let runs = || {
        std::fs::read_dir(root.dir.join("runs")).map_or(0, |d| {
            d.filter_map(|e| e.ok()).filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count()
        })
    };
    let signal = |sig: &str| {
        let (status, body) =
            post_json(&a, &format!("{}/v1/feedback", s.url), &json!({"id": event, "signal": sig, "index": 0}));
        assert_eq!(status, 200, "{body}");
    };
    signal("thumbsup");
    signal("thumbsdown");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(runs(), 0, "a run started below the threshold");
    let t0 = Instant::now();
    signal("click");
    wait_for("the policy's run", Duration::from_secs(10), || (runs() > 0).then_some(()));
    eprintln!("the policy's run was accepted {:?} after the signal that crossed the threshold", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A root whose corpus `c` captures, serve on it, and one ranking of two documents captured:
/// (root, the corpus's home, serve, an agent, the event id).
fn serve_one_captured_ranking() -> (Root, std::path::PathBuf, Serve, ureq::Agent, String) {
    let root = Root::new("");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("policy.json"), r#"{"capture": true}"#).unwrap();
    let s = Serve::fixture(&root, &[]);
    let a = agent();
    let event = capture_one(&a, &s.url, "c", &[("d1", "first text"), ("d2", "second text")]);
    (root, home, s, a, event)
}

#[test]
fn bad_feedback_is_refused_with_a_message_and_nothing_is_written() {
    let (root, home, s, a, event) = serve_one_captured_ranking();
    let snapshot =
        || (std::fs::read(home.join("feedback.jsonl")).unwrap(), std::fs::read(home.join("documents.jsonl")).unwrap());
    let before = snapshot();
    let big = "x".repeat(1 << 20);
    let url = format!("{}/v1/feedback", s.url);
    let cases: Vec<(&str, String, Value, u16)> = vec![
        ("unknown event", url.clone(), json!({"id": "0123456789abcdef", "signal": "thumbsup"}), 404),
        ("bad signal", url.clone(), json!({"id": event, "signal": "meh"}), 400),
        ("index out of range", url.clone(), json!({"id": event, "signal": "click", "index": 2}), 400),
        ("doc not shown", url.clone(), json!({"id": event, "signal": "click", "doc_id": "d9"}), 400),
        (
            "index and doc disagree",
            url.clone(),
            json!({"id": event, "signal": "click", "index": 0, "doc_id": "d2"}),
            400,
        ),
        ("1 MB field", url.clone(), json!({"id": event, "signal": big}), 413),
        ("no signal", url.clone(), json!({"id": event}), 400),
        (
            "1 MB id",
            format!("{}/v1/rerank", s.url),
            json!({"model": "c", "query": "q", "documents": [{"id": big, "text": "t"}]}),
            400,
        ),
    ];
    for (what, url, body, want) in cases {
        let (status, reply) = post_json(&a, &url, &body);
        assert_eq!(status, want, "{what}: {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "{what}: {reply}");
        eprintln!("{what}: {status} {msg:.120}");
        assert!(snapshot() == before, "{what}: something was written");
    }
    // The CLI applies the same rules.
    let cli = |args: &[&str]| {
        let mut c = root.cli_cmd(["feedback", "add", "--corpus", "c"]);
        c.args(args).output().unwrap()
    };
    let out = cli(&["--event", "nosuch", "--signal", "click"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["--event", &event, "--signal", "meh"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown signal"));
    assert!(snapshot() == before);
    let out = cli(&["--event", &event, "--signal", "star5", "--doc", "d2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, _) = post_json(&a, &url, &json!({"id": event, "signal": "thumbsdown", "index": 0}));
    assert_eq!(status, 200);
    let all = lines(&home.join("feedback.jsonl"));
    assert_eq!(all.len(), 3);
    assert_eq!((all[1]["signal"].as_str(), all[1]["doc_id"].as_str()), (Some("star5"), Some("d2")));
    assert_eq!((all[2]["signal"].as_str(), all[2]["doc_id"].as_str()), (Some("thumbsdown"), Some("d1")));
    // A corpus without capture records nothing.
    std::fs::create_dir_all(root.dir.join("corpora/quiet")).unwrap();
    capture_one(&a, &s.url, "quiet", &[("x", "y")]);
    assert!(!root.dir.join("corpora/quiet/feedback.jsonl").exists());
}

/// `POST /v1/feedback`'s `corpus` is a name, never a path: an absolute path or one with `..` is
/// refused with a 4xx and nothing is written or created anywhere, even where the path holds a
/// feedback file with the very event named (which an attacker could plant).
#[test]
fn a_feedback_corpus_that_is_a_path_is_refused_and_writes_nothing() {
    let (root, home, s, a, event) = serve_one_captured_ranking();
    // A copy of the corpus's files outside the root, reachable by an absolute path or by `..`.
    let outside = root.dir.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for f in ["feedback.jsonl", "documents.jsonl", "policy.json"] {
        std::fs::copy(home.join(f), outside.join(f)).unwrap();
    }
    let listing = |dir: &Path| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .filter(|(name, _)| !name.ends_with(".log")) // the servers' own logs beside the root
            .collect();
        v.sort();
        v
    };
    let parent = root.dir.parent().unwrap().to_path_buf();
    let before = (listing(&parent), listing(&outside), listing(&root.dir), listing(&home));
    let url = format!("{}/v1/feedback", s.url);
    for corpus in [outside.display().to_string(), "../../outside".into(), "..".into(), "c/../c".into(), "/".into()] {
        let (status, reply) =
            post_json(&a, &url, &json!({"id": event, "signal": "thumbsup", "index": 0, "corpus": corpus}));
        assert!((400..500).contains(&status), "{corpus}: {status} {reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| m.contains("corpus")), "{corpus}: {reply}");
        let after = (listing(&parent), listing(&outside), listing(&root.dir), listing(&home));
        assert!(after == before, "{corpus}: something was written or created: {before:?} -> {after:?}");
    }
    // The same event with its real corpus is recorded.
    let (status, reply) = post_json(&a, &url, &json!({"id": event, "signal": "thumbsup", "index": 0, "corpus": "c"}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(lines(&home.join("feedback.jsonl")).len(), 2);
}

#[test]
fn kill_9_of_serve_in_the_middle_of_appends_leaves_valid_jsonl() {
    let root = Root::new("");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("policy.json"), r#"{"capture": true}"#).unwrap();
    let mut s = Serve::fixture(&root, &[]);
    let event = capture_one(&agent(), &s.url, "c", &[("d1", "one"), ("d2", "two")]);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (url, event, stop, ok) = (format!("{}/v1/feedback", s.url), event.clone(), stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let a = ureq::Agent::new_with_config(
                    ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(5)))
                        .build(),
                );
                while !stop.load(Ordering::Relaxed) {
                    let r = a
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(json!({"id": event, "signal": "click", "doc_id": "d1"}).to_string());
                    match r {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        })
        .collect();
    wait_for("appends under way", Duration::from_secs(30), || (ok.load(Ordering::Relaxed) > 300).then_some(()));
    let pid = s.child.as_ref().unwrap().id();
    kill_pid(pid, libc::SIGKILL);
    let _ = s.child.take().unwrap().wait();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acknowledged = ok.load(Ordering::Relaxed);
    // Every complete line is a whole event; at most a torn tail, which readers skip.
    let bytes = std::fs::read(home.join("feedback.jsonl")).unwrap();
    let complete = &bytes[..bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)];
    let events: Vec<Value> = complete
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l).unwrap_or_else(|e| panic!("a garbled line ({e}): {}", String::from_utf8_lossy(l)))
        })
        .collect();
    let signals = events.iter().filter(|e| e["signal"] == "click").count();
    assert!(signals >= acknowledged, "{acknowledged} signals acknowledged, {signals} recorded");
    // A torn tail (as a crashed script would leave) is cut by the next append, never glued to.
    let mut f = std::fs::OpenOptions::new().append(true).open(home.join("feedback.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"event_id\": \"torn").unwrap();
    drop(f);
    let s = Serve::fixture(&root, &[]);
    let (status, body) =
        post_json(&agent(), &format!("{}/v1/feedback", s.url), &json!({"id": event, "signal": "thumbsup", "index": 1}));
    assert_eq!(status, 200, "{body}");
    let all = lines(&home.join("feedback.jsonl"));
    assert_eq!(all.last().unwrap()["signal"], "thumbsup");
    assert_eq!(all.len(), events.len() + 1);
    eprintln!("kill -9 mid-append: {acknowledged} acknowledged, {signals} recorded, file valid");
}

#[test]
fn a_failed_policy_run_is_not_retried_until_more_feedback_arrives() {
    let root = Root::new("rescan_s = 1\n");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("policy.json"), r#"{"capture": true, "retrain_after_events": 2, "min_interval_s": 0}"#)
        .unwrap();
    // A template that can only fail: its model does not exist.
    let job = json!({"model": "/nonexistent/model", "data": {"feedback": "feedback.jsonl", "documents": "documents.jsonl"}, "device": "cpu"});
    std::fs::write(home.join("job.json"), job.to_string()).unwrap();
    let _daemon = DaemonGuard(root.daemon());
    let s = Serve::fixture(&root, &[]);
    let a = agent();
    let event = capture_one(&a, &s.url, "c", &[("d1", "one"), ("d2", "two")]);
    for signal in ["thumbsup", "thumbsdown"] {
        assert_eq!(
            post_json(&a, &format!("{}/v1/feedback", s.url), &json!({"id": event, "signal": signal, "index": 0})).0,
            200
        );
    }
    let runs = || -> Vec<String> {
        // Run directories only (a run is built in a hidden temporary directory first).
        std::fs::read_dir(root.dir.join("runs"))
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .filter(|n| n.starts_with("c__"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = wait_for("the policy run", Duration::from_secs(30), || runs().into_iter().next());
    let st = wait_state(&root, &first, &["completed", "failed", "cancelled"], Duration::from_secs(60));
    assert_eq!(st["state"], "failed", "{st}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(runs().len(), 1, "a failed policy run was started again on the same feedback");
    // New feedback: the policy may try again (and fails again, once).
    for signal in ["click", "star5"] {
        assert_eq!(
            post_json(&a, &format!("{}/v1/feedback", s.url), &json!({"id": event, "signal": signal, "index": 1})).0,
            200
        );
    }
    wait_for("a second policy run", Duration::from_secs(30), || (runs().len() == 2).then_some(()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(runs().len(), 2);
}
