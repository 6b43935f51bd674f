//! `rerankd serve` through real HTTP on loopback with the fixture model: both API shapes against
//! `rerankd score`, hot reload under load (a real promotion through the daemon, and a rollback),
//! concurrency and overload, bad input, the API key, a Unix socket, SIGTERM draining, kill -9
//! isolation from the daemon, and serve's idle CPU.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

/// A response: status, the adapter header, the JSON body (Null when not JSON), Retry-After.
struct Reply {
    status: u16,
    adapter: Option<String>,
    body: Value,
    retry_after: Option<String>,
}

fn send(a: &ureq::Agent, method: &str, url: &str, body: Option<&[u8]>, token: Option<&str>) -> Reply {
    let mut r = match method {
        "GET" => {
            let mut req = a.get(url);
            if let Some(t) = token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            req.call().unwrap()
        }
        _ => {
            let mut req = a.post(url).header("Content-Type", "application/json");
            if let Some(t) = token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            req.send(body.unwrap_or_default()).unwrap()
        }
    };
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (adapter, retry_after) = (header("x-rerankd-adapter"), header("retry-after"));
    let status = r.status().as_u16();
    let text = r.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    Reply { status, adapter, body: serde_json::from_str(&text).unwrap_or(Value::Null), retry_after }
}

fn post(a: &ureq::Agent, url: &str, body: &Value) -> Reply {
    send(a, "POST", url, Some(body.to_string().as_bytes()), None)
}

fn get(a: &ureq::Agent, url: &str) -> Reply {
    send(a, "GET", url, None, None)
}

const RUN: &str = "docs__20261127_120000";
const INSTRUCTION: &str = "Given a question, find the passage that answers it";

/// A root whose corpus `docs` has the fixture's PEFT adapter promoted (as a run leaves it), with
/// a short max_length so long documents are truncated.
fn root_with_promoted_adapter(config: &str) -> Root {
    let root = Root::new(config);
    std::fs::create_dir_all(root.dir.join("corpora/docs")).unwrap();
    let dir = root.dir.join("models/docs/adapters").join(RUN);
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3/peft_adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let manifest = json!({"model": fixture_model(), "corpus": "docs", "run_id": RUN, "max_length": 100,
                          "instruction": INSTRUCTION});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::os::unix::fs::symlink(Path::new("adapters").join(RUN), root.dir.join("models/docs/current")).unwrap();
    root
}

fn docs() -> Vec<String> {
    vec![
        "Rust is a systems programming language focused on safety and speed.".into(),
        "Bananas are yellow and rich in potassium.".into(),
        "The borrow checker enforces ownership rules at compile time. ".repeat(12),
        "Cargo builds Rust code and downloads its dependencies.".into(),
        "A reranker orders retrieved passages by relevance to a query.".into(),
    ]
}

/// Results (`index` plus a score field) in descending order, covering the expected indices, with
/// each score equal to the expected one.
fn check_ranked(results: &[Value], field: &str, expected: &[f64], n: usize, tol: f64) {
    assert_eq!(results.len(), n, "{results:?}");
    let mut seen = std::collections::HashSet::new();
    let mut last = f64::INFINITY;
    for r in results {
        let i = r["index"].as_u64().unwrap() as usize;
        let s = r[field].as_f64().unwrap();
        assert!(seen.insert(i), "index {i} twice");
        assert!(s <= last, "not sorted descending: {results:?}");
        last = s;
        assert!((s - expected[i]).abs() <= tol, "index {i}: served {s}, rerankd score {}", expected[i]);
    }
    // top_n keeps the best: every index left out scores no higher than the last one kept.
    for (i, &e) in expected.iter().enumerate() {
        if !seen.contains(&i) {
            assert!(e <= last + tol, "index {i} ({e}) left out of the top {n}");
        }
    }
}

#[test]
fn both_api_shapes_answer_as_documented_and_equal_rerankd_score() {
    let root = root_with_promoted_adapter("");
    let model = fixture_model();
    let s = Serve::start(
        &root,
        &["--listen", "127.0.0.1:0", "--model", &model, "--default-corpus", "docs", "--device", "cpu"],
        &[],
    );
    let a = agent();
    let query = "what is rust";
    let docs = docs();
    let expected = score_cli(&root, &["--corpus", "docs"], query, &docs);
    let sig: Vec<f64> = expected.iter().map(|e| e.0).collect();
    let raw: Vec<f64> = expected.iter().map(|e| e.1).collect();

    // TEI, default corpus and by route; unknown fields ignored.
    for path in ["/rerank", "/corpora/docs/rerank"] {
        let r = post(
            &a,
            &format!("{}{path}", s.url),
            &json!({"query": query, "texts": docs, "return_text": true, "extra": 1}),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.adapter.as_deref(), Some(RUN));
        let results = r.body.as_array().unwrap();
        check_ranked(results, "score", &sig, docs.len(), 1e-6);
        for x in results {
            assert_eq!(x["text"], docs[x["index"].as_u64().unwrap() as usize].as_str());
        }
    }
    let r = post(&a, &format!("{}/rerank", s.url), &json!({"query": query, "texts": docs, "raw_scores": true}));
    check_ranked(r.body.as_array().unwrap(), "score", &raw, docs.len(), 1e-6);
    assert!(r.body[0].get("text").is_none(), "text without return_text");

    // Cohere v1 / Jina: top_n, return_documents, strings and {text, id} objects.
    let objects: Vec<Value> = docs.iter().enumerate().map(|(i, d)| json!({"text": d, "id": format!("d{i}")})).collect();
    for (path, documents) in [("/v1/rerank", json!(docs)), ("/v2/rerank", json!(objects))] {
        let req =
            json!({"model": "docs", "query": query, "documents": documents, "top_n": 2, "return_documents": true});
        let r = post(&a, &format!("{}{path}", s.url), &req);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.adapter.as_deref(), Some(RUN));
        check_ranked(r.body["results"].as_array().unwrap(), "relevance_score", &sig, 2, 1e-6);
        for x in r.body["results"].as_array().unwrap() {
            assert_eq!(x["document"]["text"], docs[x["index"].as_u64().unwrap() as usize].as_str());
        }
        let id = r.body["id"].as_str().unwrap();
        assert!(id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(r.body["meta"]["adapter"], RUN);
        assert_eq!(r.body["meta"]["corpus"], "docs");
        assert!(r.body["meta"]["api_version"]["version"].is_string());
        assert!(r.body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }
    // Without return_documents and top_n: every document, no texts; the model named by run id.
    let r = post(
        &a,
        &format!("{}/v1/rerank", s.url),
        &json!({"model": format!("docs@{RUN}"), "query": query, "documents": docs}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    check_ranked(r.body["results"].as_array().unwrap(), "relevance_score", &sig, docs.len(), 1e-6);
    assert!(r.body["results"][0].get("document").is_none());

    // `base`: the base model with the default instruction and max_length, as `rerankd score --model`.
    let base = score_cli(&root, &["--model", &model], query, &docs);
    let base_sig: Vec<f64> = base.iter().map(|e| e.0).collect();
    let r = post(&a, &format!("{}/v1/rerank", s.url), &json!({"model": "base", "query": query, "documents": docs}));
    assert_eq!(r.adapter.as_deref(), Some("base"));
    check_ranked(r.body["results"].as_array().unwrap(), "relevance_score", &base_sig, docs.len(), 1e-6);
    assert!(sig.iter().zip(&base_sig).any(|(x, y)| (x - y).abs() > 1e-4), "the adapter changes nothing?");

    // max_tokens_per_doc cuts each document before the prompt is built.
    let cut: Vec<String> = docs.iter().map(|d| d.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
    let r = post(
        &a,
        &format!("{}/v2/rerank", s.url),
        &json!({"model": "docs", "query": query, "documents": docs, "max_tokens_per_doc": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let cut_expected: Vec<f64> = score_cli(&root, &["--corpus", "docs"], query, &cut).iter().map(|e| e.0).collect();
    let served: Vec<f64> =
        r.body["results"].as_array().unwrap().iter().map(|x| x["relevance_score"].as_f64().unwrap()).collect();
    assert!(served.iter().any(|s| cut_expected.iter().any(|e| (s - e).abs() < 1e-6)), "{served:?} vs {cut_expected:?}");

    let h = get(&a, &format!("{}/health", s.url));
    assert_eq!(h.status, 200);
    let m = get(&a, &format!("{}/v1/models", s.url));
    let docs_model = m.body["data"].as_array().unwrap().iter().find(|x| x["id"] == "docs").unwrap().clone();
    assert_eq!(docs_model["adapter"], RUN);
    assert_eq!(docs_model["max_length"], 100);
    assert_eq!(docs_model["instruction"], INSTRUCTION);
    let metrics = a.get(format!("{}/metrics", s.url)).call().unwrap().body_mut().read_to_string().unwrap();
    for name in [
        "rerankd_requests_total{",
        "rerankd_pairs_scored_total",
        "rerankd_batch_size_bucket",
        "rerankd_queue_pairs",
        "rerankd_request_duration_seconds_bucket",
        "rerankd_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    // The same query was sent to `docs` more than once: later requests took its prompt prefix
    // (template, instruction, query) from the earlier one's keys and values.
    let reused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rerankd_prefix_tokens_reused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no prefix_tokens_reused counter in /metrics:\n{metrics}"));
    assert!(reused > 0.0, "no prompt prefix was reused across requests");
    let info: Value = serde_json::from_str(&std::fs::read_to_string(root.dir.join("serve.json")).unwrap()).unwrap();
    assert_eq!(info["adapters"]["docs"], RUN);
    assert!(info["rss_mb"].as_u64().unwrap() > 0);
    let doctor = root.cli_cmd(["doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains(&format!("serve runs (pid {})", s.pid())) && text.contains(&format!("docs={RUN}")), "{text}");
    assert_eq!(s.stop(), Some(0));
    assert!(!root.dir.join("serve.json").exists(), "serve.json left after a clean stop");
}

#[test]
fn bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving() {
    let root = root_with_promoted_adapter("");
    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &fixture_model(), "--device", "cpu"], &[]);
    let a = agent();
    let u = |p: &str| format!("{}{p}", s.url);
    let many: Vec<String> = (0..10_000).map(|i| format!("d{i}")).collect();
    let long = "word ".repeat(400);
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        // TEI's routes answer as TEI does: validation 422, an empty batch 400, sizes 413.
        ("malformed JSON", u("/rerank"), b"{\"query\": \"q\", \"texts\": [".to_vec(), 422),
        ("missing field", u("/rerank"), br#"{"texts": ["a"]}"#.to_vec(), 422),
        ("empty texts", u("/corpora/docs/rerank"), br#"{"query": "q", "texts": []}"#.to_vec(), 400),
        (
            "10 MB body",
            u("/corpora/docs/rerank"),
            format!(r#"{{"query": "q", "texts": ["{}"]}}"#, "x".repeat(10 << 20)).into_bytes(),
            413,
        ),
        (
            "10,000 documents",
            u("/v1/rerank"),
            json!({"model": "docs", "query": "q", "documents": many}).to_string().into_bytes(),
            413,
        ),
        ("unknown corpus", u("/v1/rerank"), br#"{"model": "nosuch", "query": "q", "documents": ["a"]}"#.to_vec(), 404),
        (
            "unknown run",
            u("/v1/rerank"),
            br#"{"model": "docs@docs__20200101_000000", "query": "q", "documents": ["a"]}"#.to_vec(),
            404,
        ),
        ("non-UTF-8", u("/corpora/docs/rerank"), b"{\"query\": \"q\xff\xfe\", \"texts\": [\"a\"]}".to_vec(), 422),
        ("../ in the route", u("/corpora/..%2F..%2Fetc/rerank"), br#"{"query": "q", "texts": ["a"]}"#.to_vec(), 404),
        (
            "../ as a model",
            u("/v2/rerank"),
            br#"{"model": "../../etc", "query": "q", "documents": ["a"]}"#.to_vec(),
            404,
        ),
        (
            "top_n 0",
            u("/v1/rerank"),
            br#"{"model": "docs", "query": "q", "documents": ["a"], "top_n": 0}"#.to_vec(),
            400,
        ),
        ("texts not strings", u("/corpora/docs/rerank"), br#"{"query": "q", "texts": [1, 2]}"#.to_vec(), 422),
        (
            "truncate false and too long",
            u("/corpora/docs/rerank"),
            json!({"query": "q", "texts": [long], "truncate": false}).to_string().into_bytes(),
            413,
        ),
        ("no such endpoint", u("/v3/rerank"), b"{}".to_vec(), 404),
    ];
    let tei = TeiSchema::load();
    for (what, url, body, want) in cases {
        let r = send(&a, "POST", &url, Some(&body), None);
        assert_eq!(r.status, want, "{what}: {}", r.body);
        let tei_route = url.ends_with("/rerank") && !url.contains("/v");
        let msg = if tei_route {
            tei.check("ErrorResponse", &r.body)
                .unwrap_or_else(|e| panic!("{what}: not TEI's ErrorResponse: {e}: {}", r.body));
            r.body["error"].as_str().unwrap_or_default()
        } else {
            assert!(r.body["error"]["type"].is_string(), "{what}: no JSON error: {}", r.body);
            r.body["error"]["message"].as_str().unwrap_or_default()
        };
        assert!(!msg.is_empty(), "{what}: no message: {}", r.body);
        eprintln!("{what}: {} {msg:.160}", r.status);
        let ok = post(&a, &u("/corpora/docs/rerank"), &json!({"query": "q", "texts": ["a", "b"]}));
        assert_eq!(ok.status, 200, "after {what}: {}", ok.body);
        tei.check("RerankResponse", &ok.body).unwrap_or_else(|e| panic!("not TEI's RerankResponse: {e}: {}", ok.body));
    }
    // Every error has a JSON body, a wrong method too.
    let r = send(&a, "GET", &u("/v1/rerank"), None, None);
    assert_eq!((r.status, r.body["error"]["type"].as_str()), (405, Some("method_not_allowed")), "{}", r.body);
    assert_eq!(s.stop(), Some(0));
}

/// TEI's published OpenAPI schemas (vendored in tests/data/tei), checked with the subset of JSON
/// Schema they use: `$ref`, `type`, `required`, `properties`, `items`, `enum`, `nullable`.
struct TeiSchema(Value);

impl TeiSchema {
    fn load() -> Self {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tei/openapi.json");
        Self(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    }

    fn check(&self, name: &str, v: &Value) -> Result<(), String> {
        self.check_against(&self.0["components"]["schemas"][name], v, name)
    }

    fn check_against(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            return self.check_against(&self.0["components"]["schemas"][name], v, at);
        }
        if v.is_null() && schema["nullable"] == true {
            return Ok(());
        }
        if let Some(e) = schema["enum"].as_array()
            && !e.contains(v)
        {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
        let ok = match schema["type"].as_str() {
            Some("object") => v.is_object(),
            Some("array") => v.is_array(),
            Some("string") => v.is_string(),
            Some("number") => v.is_number(),
            Some("integer") => v.is_u64() || v.is_i64(),
            Some("boolean") => v.is_boolean(),
            _ => true,
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {}", schema["type"]));
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            let k = r.as_str().unwrap();
            if v.get(k).is_none() {
                return Err(format!("{at}: `{k}` is required"));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, s) in props {
                if let Some(x) = v.get(k) {
                    self.check_against(s, x, &format!("{at}.{k}"))?;
                }
            }
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in v.as_array().into_iter().flatten().enumerate() {
                self.check_against(items, x, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

/// Hammers `/v1/rerank` from `clients` threads until `stop`; every reply is kept with the time it
/// was sent.
fn hammer(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
    query: String,
    docs: Vec<String>,
) -> Vec<std::thread::JoinHandle<Vec<(Instant, Reply)>>> {
    (0..clients)
        .map(|_| {
            let (url, stop, query, docs) = (url.clone(), stop.clone(), query.clone(), docs.clone());
            std::thread::spawn(move || {
                let a = agent();
                let mut out = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    out.push((t, post(&a, &url, &json!({"model": "docs", "query": query, "documents": docs}))));
                }
                out
            })
        })
        .collect()
}

#[test]
fn a_promotion_and_a_rollback_are_served_within_two_seconds_under_load_with_no_failed_request() {
    let root = Root::new("rescan_s = 1\n");
    std::fs::create_dir_all(root.dir.join("corpora/docs")).unwrap();
    let _daemon = DaemonGuard(root.daemon());
    let mut job = root.job("docs", 1);
    job["promote"] = json!("always");
    let run1 = root.submit("one.json", &job);
    wait_state(&root, &run1, &["completed"], Duration::from_secs(120));
    assert_eq!(std::fs::read_link(root.dir.join("models/docs/current")).unwrap().file_name().unwrap(), run1.as_str());
    // Plain-text triplets: eval.json still names every document (a content id and its start).
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(root.dir.join("runs").join(&run1).join("eval.json")).unwrap())
            .unwrap();
    let list = &eval["lists"][0];
    let (ids, texts) = (list["ids"].as_array().unwrap(), list["texts"].as_array().unwrap());
    assert!(!ids.is_empty() && ids.len() == texts.len(), "{list}");
    assert!(ids.iter().all(|i| i.as_str().is_some_and(|i| i.starts_with("sha256:"))), "{list}");
    assert!(texts.iter().all(|t| t.as_str().is_some_and(|t| !t.is_empty() && t.chars().count() <= 80)), "{list}");

    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &fixture_model(), "--device", "cpu"], &[]);
    let query = "q3".to_string();
    let docs: Vec<String> = ["answer 3", "noise", "other", "answer 7"].map(String::from).to_vec();
    let expected_of = |run: &str| -> Vec<f64> {
        let dir = root.dir.join("models/docs/adapters").join(run);
        score_cli(&root, &["--adapter", dir.to_str().unwrap()], &query, &docs).iter().map(|e| e.0).collect()
    };
    let mut expected: HashMap<String, Vec<f64>> = HashMap::new();
    expected.insert(run1.clone(), expected_of(&run1));

    let stop = Arc::new(AtomicBool::new(false));
    let threads = hammer(format!("{}/v1/rerank", s.url), 4, stop.clone(), query.clone(), docs.clone());
    std::thread::sleep(Duration::from_millis(500));
    // A real promotion: a second run through the daemon with policy `always`.
    // Two epochs: another adapter than run 1's (same data, same seed).
    job["train"]["epochs"] = json!(2);
    let run2 = root.submit("two.json", &job);
    let current = root.dir.join("models/docs/current");
    let is_current = |run: &str| std::fs::read_link(&current).ok().is_some_and(|t| t.file_name().unwrap() == run);
    wait_for("run 2 promoted", Duration::from_secs(120), || is_current(&run2).then_some(()));
    let promoted_at = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    // And a rollback by hand.
    let out = root.cli_cmd(["rollback", "docs"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rolled_back_at = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Release);
    let replies: Vec<Vec<(Instant, Reply)>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    wait_state(&root, &run2, &["completed"], Duration::from_secs(60));
    expected.insert(run2.clone(), expected_of(&run2));
    assert_ne!(expected[&run1], expected[&run2], "two runs with the same scores prove nothing");

    let total: usize = replies.iter().map(Vec::len).sum();
    let mut first_new: Option<Instant> = None;
    let mut first_back: Option<Instant> = None;
    for thread in &replies {
        for (t, r) in thread {
            assert_eq!(r.status, 200, "a failed request during reload: {}", r.body);
            let label = r.adapter.clone().unwrap();
            assert_eq!(r.body["meta"]["adapter"].as_str(), Some(label.as_str()));
            // Scored by the adapter it names, entirely (no mix within a request).
            let want = expected.get(&label).unwrap_or_else(|| panic!("labelled with unknown adapter {label}"));
            check_ranked(r.body["results"].as_array().unwrap(), "relevance_score", want, docs.len(), 1e-6);
            if label == run2 && first_new.is_none_or(|f| *t < f) {
                first_new = Some(*t);
            }
            if *t >= rolled_back_at && label == run1 && first_back.is_none_or(|f| *t < f) {
                first_back = Some(*t);
            }
        }
        // Sent after the swap was visible plus 2 s, every request gets the new adapter.
        for (t, r) in thread {
            let label = r.adapter.as_deref().unwrap();
            if *t > promoted_at + Duration::from_secs(2) && *t < rolled_back_at {
                assert_eq!(label, run2, "still the old adapter 2 s after the promotion");
            }
            if *t > rolled_back_at + Duration::from_secs(2) {
                assert_eq!(label, run1, "still the rolled-back adapter 2 s after the rollback");
            }
        }
    }
    let lag = |first: Option<Instant>, at: Instant| first.map(|f| f.saturating_duration_since(at));
    eprintln!(
        "{total} requests, 0 failed; promotion served after {:?}, rollback after {:?}",
        lag(first_new, promoted_at),
        lag(first_back, rolled_back_at)
    );
    assert!(first_new.is_some() && first_back.is_some());
    let reloads = agent().get(format!("{}/metrics", s.url)).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(reloads.contains("rerankd_adapter_reloads_total{corpus=\"docs\",result=\"ok\"} 2"), "{reloads}");
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn many_concurrent_clients_are_all_answered_and_overload_is_refused_not_hung() {
    let root = root_with_promoted_adapter("");
    let model = fixture_model();
    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &model, "--device", "cpu"], &[]);
    let queries: Vec<String> = (0..4).map(|i| format!("query number {i}")).collect();
    let docs = docs();
    let expected: Vec<Vec<f64>> = queries
        .iter()
        .map(|q| score_cli(&root, &["--corpus", "docs"], q, &docs).iter().map(|e| e.0).collect())
        .collect();
    // 200 requests from 32 connections.
    let next = Arc::new(Mutex::new(0usize));
    let results: Vec<Vec<(usize, Reply)>> = (0..32)
        .map(|_| {
            let (url, next, queries, docs) =
                (format!("{}/v1/rerank", s.url), next.clone(), queries.clone(), docs.clone());
            std::thread::spawn(move || {
                let a = agent();
                let mut out = Vec::new();
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        if *n == 200 {
                            break;
                        }
                        *n += 1;
                        *n - 1
                    };
                    let q = i % queries.len();
                    out.push((q, post(&a, &url, &json!({"model": "docs", "query": queries[q], "documents": docs}))));
                }
                out
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut n = 0;
    for (q, r) in results.iter().flatten() {
        assert_eq!(r.status, 200, "{}", r.body);
        check_ranked(r.body["results"].as_array().unwrap(), "relevance_score", &expected[*q], docs.len(), 1e-6);
        n += 1;
    }
    assert_eq!(n, 200);
    let m = agent().get(format!("{}/metrics", s.url)).call().unwrap().body_mut().read_to_string().unwrap();
    let metric = |name: &str| -> f64 {
        m.lines().find(|l| l.starts_with(name)).and_then(|l| l.split(' ').nth(1)).unwrap().parse().unwrap()
    };
    let (pairs, batches) = (metric("rerankd_batch_size_sum"), metric("rerankd_batch_size_count"));
    eprintln!("200 requests answered; {pairs} pairs in {batches} forwards ({:.1} pairs per forward)", pairs / batches);
    assert_eq!(metric("rerankd_queue_pairs"), 0.0, "pairs left admitted after every answer");
    assert_eq!(s.stop(), Some(0));

    // Overload: a slow scorer and a queue of 16 pairs; 24 clients of 8 documents at once.
    std::fs::write(root.dir.join("config.toml"), "[serve]\nmax_documents = 16\nmax_queue_pairs = 16\n").unwrap();
    let s = Serve::start(
        &root,
        &["--listen", "127.0.0.1:0", "--model", &model, "--device", "cpu"],
        &[("RERANKD_TEST_SCORE_SLEEP_MS", "300")],
    );
    let eight: Vec<String> = (0..8).map(|i| format!("document {i}")).collect();
    let t0 = Instant::now();
    let replies: Vec<Reply> = (0..24)
        .map(|_| {
            let (url, docs) = (format!("{}/v1/rerank", s.url), eight.clone());
            std::thread::spawn(move || post(&agent(), &url, &json!({"model": "docs", "query": "q", "documents": docs})))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    eprintln!("overload: {ok} answered, {} refused with 429, in {:?}", refused.len(), t0.elapsed());
    assert_eq!(ok + refused.len(), 24, "only 200 or 429: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(ok >= 2 && !refused.is_empty(), "{ok} answered");
    for r in refused {
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        assert_eq!(r.body["error"]["type"], "overloaded");
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "overload took {:?}", t0.elapsed());
    let after =
        post(&agent(), &format!("{}/v1/rerank", s.url), &json!({"model": "docs", "query": "q", "documents": ["a"]}));
    assert_eq!(after.status, 200);
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn a_non_loopback_address_needs_an_api_key_and_the_key_is_checked() {
    let root = root_with_promoted_adapter("");
    let model = fixture_model();
    let out = root.cli_cmd(["serve", "--listen", "0.0.0.0:0", "--model", &model, "--device", "cpu"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-key-file") && err.contains("0.0.0.0"), "{err}");
    assert!(!root.dir.join("serve.json").exists());

    let key = root.dir.parent().unwrap().join("key");
    std::fs::write(&key, "s3cret-token\n").unwrap();
    let s = Serve::start(
        &root,
        &["--listen", "0.0.0.0:0", "--api-key-file", key.to_str().unwrap(), "--model", &model, "--device", "cpu"],
        &[],
    );
    // Connect over loopback only: the port is bound on every address.
    let port = s.url.rsplit(':').next().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let a = agent();
    let body = json!({"model": "docs", "query": "q", "documents": ["a", "b"]}).to_string();
    assert_eq!(send(&a, "GET", &format!("{url}/health"), None, None).status, 200, "/health needs no key");
    for token in [None, Some("wrong"), Some("s3cret-token-but-longer"), Some("")] {
        let r = send(&a, "POST", &format!("{url}/v1/rerank"), Some(body.as_bytes()), token);
        assert_eq!(r.status, 401, "{token:?}");
        assert_eq!(r.body["error"]["type"], "unauthorized");
        assert_eq!(send(&a, "GET", &format!("{url}/v1/models"), None, token).status, 401);
    }
    let r = send(&a, "POST", &format!("{url}/v1/rerank"), Some(body.as_bytes()), Some("s3cret-token"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(send(&a, "GET", &format!("{url}/metrics"), None, Some("s3cret-token")).status, 200);
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn a_unix_socket_answers_sigterm_drains_and_an_idle_server_sleeps() {
    let root = root_with_promoted_adapter("");
    let sock = root.dir.parent().unwrap().join("serve.sock");
    let s = Serve::start(
        &root,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--model",
            &fixture_model(),
            "--device",
            "cpu",
            "--default-corpus",
            "docs",
        ],
        &[("RERANKD_TEST_SCORE_SLEEP_MS", "1500")],
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(s.url.is_empty(), "only the socket was asked for, yet it listens on {}", s.url);

    // Idle: CPU ticks over 5 s.
    let ticks = |pid: u32| rerankd::sys::cpu_ticks(pid).unwrap();
    let t0 = ticks(s.pid());
    std::thread::sleep(Duration::from_secs(5));
    let idle = ticks(s.pid()) - t0;
    let pct = idle as f64 / rerankd::sys::ticks_per_second() as f64 / 5.0 * 100.0;
    eprintln!("idle serve: {idle} ticks in 5 s ({pct:.2}% of a core)");
    assert!(pct < 1.0, "an idle serve burns {pct:.1}% of a core");

    // A request in flight (the scorer sleeps 1.5 s), then SIGTERM: it is answered, then exit 0.
    let body = json!({"query": "what is rust", "texts": ["rust", "bananas"]}).to_string();
    let sock2 = sock.clone();
    let inflight = std::thread::spawn(move || {
        let mut c = std::os::unix::net::UnixStream::connect(&sock2).unwrap();
        write!(c, "POST /rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let status = s.stop();
    let answer = inflight.join().unwrap();
    eprintln!("drained and stopped in {:?}", t0.elapsed());
    assert_eq!(status, Some(0));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-rerankd-adapter: docs__20261127_120000") && answer.contains("\"index\""), "{answer}");
    assert!(!sock.exists(), "the socket file is left behind");
}

#[test]
fn kill_9_of_serve_never_touches_the_daemon_and_a_restart_serves_the_current_adapter() {
    let root = Root::new("memory_budget_mb = 8000\n");
    std::fs::create_dir_all(root.dir.join("corpora/docs")).unwrap();
    let model = fixture_model();
    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &model, "--device", "cpu"], &[]);
    let serve_mb = rerankd::sys::process_memory_mb(s.pid()).unwrap();
    let mut daemon = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_STEP_SLEEP_MS", "100")]));
    let mut job = root.job("docs", 2);
    job["promote"] = json!("always");
    let run = root.submit("one.json", &job);
    // serve's resident memory is left out of the default budget of new runs.
    let budget = serde_json::from_str::<Value>(
        &std::fs::read_to_string(root.dir.join("runs").join(&run).join("job.json")).unwrap(),
    )
    .unwrap()["memory_budget_mb"]
        .as_u64()
        .unwrap();
    eprintln!("serve holds {serve_mb} MB; the run's default budget is {budget} MB of 8000");
    assert!(budget < 8000 && budget + serve_mb + 64 >= 8000, "budget {budget} with serve at {serve_mb} MB");

    wait_steps(&root, &run, 2);
    kill_pid(s.pid(), libc::SIGKILL);
    drop(s);
    let st = wait_state(&root, &run, &["completed", "failed", "cancelled"], Duration::from_secs(120));
    assert_eq!(st["state"], "completed", "{st}");
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon died with serve");
    assert!(rerankd::store::serving::live(&rerankd::store::Root { dir: root.dir.clone() }).is_none());

    // A restart takes the lock the dead one left and serves what is current now.
    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &model, "--device", "cpu"], &[]);
    let r = post(
        &agent(),
        &format!("{}/v1/rerank", s.url),
        &json!({"model": "docs", "query": "q1", "documents": ["answer 1", "noise"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.adapter.as_deref(), Some(run.as_str()));
    // A second serve on the same root is refused.
    let out = root.cli_cmd(["serve", "--listen", "127.0.0.1:0", "--model", &model]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn a_promoted_adapter_that_fails_to_load_keeps_the_previous_one_serving_and_is_reported() {
    let root = root_with_promoted_adapter("");
    let s = Serve::start(&root, &["--listen", "127.0.0.1:0", "--model", &fixture_model(), "--device", "cpu"], &[]);
    let a = agent();
    let req = json!({"model": "docs", "query": "q", "documents": ["a", "b"]});
    assert_eq!(post(&a, &format!("{}/v1/rerank", s.url), &req).adapter.as_deref(), Some(RUN));
    // A "promotion" of an adapter whose tensors are garbage.
    let bad = "docs__20261127_130000";
    let dir = root.dir.join("models/docs/adapters").join(bad);
    std::fs::create_dir_all(&dir).unwrap();
    let good = root.dir.join("models/docs/adapters").join(RUN);
    for f in ["adapter_config.json", "manifest.json"] {
        std::fs::copy(good.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("adapter_model.safetensors"), b"not safetensors").unwrap();
    let link = root.dir.join("models/docs/current.tmp");
    std::os::unix::fs::symlink(Path::new("adapters").join(bad), &link).unwrap();
    std::fs::rename(&link, root.dir.join("models/docs/current")).unwrap();

    let models = wait_for("the load error in /v1/models", Duration::from_secs(5), || {
        let m = get(&a, &format!("{}/v1/models", s.url)).body;
        let docs = m["data"].as_array()?.iter().find(|x| x["id"] == "docs")?.clone();
        docs.get("load_error").is_some().then_some(docs)
    });
    assert_eq!(models["adapter"], RUN, "{models}");
    assert!(models["load_error"].as_str().unwrap().contains("adapter_model.safetensors"), "{models}");
    let r = post(&a, &format!("{}/v1/rerank", s.url), &req);
    assert_eq!((r.status, r.adapter.as_deref()), (200, Some(RUN)), "{}", r.body);
    let m = a.get(format!("{}/metrics", s.url)).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(m.contains("rerankd_adapter_reloads_total{corpus=\"docs\",result=\"failed\"} 1"), "{m}");
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains(&format!("keeping {RUN}")), "{log}");
    let doctor = String::from_utf8(root.cli_cmd(["doctor"]).output().unwrap().stdout).unwrap();
    assert!(doctor.contains("failed to load"), "{doctor}");

    // Fixed in place (a real fix would be a rollback): SIGHUP retries it.
    std::fs::copy(good.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    kill_pid(s.pid(), libc::SIGHUP);
    wait_for("the fixed adapter served", Duration::from_secs(5), || {
        (post(&a, &format!("{}/v1/rerank", s.url), &req).adapter.as_deref() == Some(bad)).then_some(())
    });
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn install_writes_a_second_unit_for_serve() {
    let root = Root::new("");
    let dir = root.dir.parent().unwrap();
    let unit = dir.join("serve.service");
    let out = root
        .cli_cmd([
            "install-systemd",
            "--serve",
            "--dest",
            unit.to_str().unwrap(),
            "--",
            "--default-corpus",
            "notes",
            "--listen",
            "127.0.0.1:9000",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&unit).unwrap();
    let root_s = root.dir.display().to_string();
    assert_eq!(
        exec_start(&text),
        [BIN, "--root", &root_s, "serve", "--default-corpus", "notes", "--listen", "127.0.0.1:9000"],
        "{text}"
    );
    assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(text.contains("LimitNOFILE=65536"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("enable --now rerankd-serve.service"));

    let plist = dir.join("serve.plist");
    let out = root
        .cli_cmd(["install-launchd", "--serve", "--dest", plist.to_str().unwrap(), "--", "--default-corpus", "a&b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&plist).unwrap();
    for needle in [
        "<string>io.rerankd.serve</string>",
        "<string>serve</string>",
        "<string>--default-corpus</string>",
        "<string>a&amp;b</string>",
        "rerankd-serve.err.log",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // --dest may be a directory: the usual file name is written into it.
    let units = dir.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let out = root.cli_cmd(["install-systemd", "--serve", "--dest", units.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(units.join("rerankd-serve.service").is_file());
    let out =
        root.cli_cmd(["install-launchd", "--dest", &format!("{}/", dir.join("agents").display())]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("agents/io.rerankd.daemon.plist").is_file());
    // The daemon's own unit is unchanged by the flag's existence.
    let out = root.cli_cmd(["install-systemd", "--dest", dir.join("d.service").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    assert!(std::fs::read_to_string(dir.join("d.service")).unwrap().contains(" daemon --root "));

    // A root whose path holds spaces, quotes, a backslash, `$` and `%`: both units pass it, and
    // every argument, to rerankd as it is.
    let odd = dir.join("my \"odd\" root's $HOME %h \\ dir");
    let odd_s = odd.display().to_string();
    let args = ["--default-corpus", "notes x", "--api-key-file", "/k/$USER's %i"];
    for (cmd, file) in [("install-systemd", "odd.service"), ("install-launchd", "odd.plist")] {
        let dest = dir.join(file);
        let out = std::process::Command::new(BIN)
            .arg("--root")
            .arg(&odd)
            .args([cmd, "--serve", "--dest", dest.to_str().unwrap(), "--"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&dest).unwrap();
        let words = if file.ends_with(".service") {
            exec_start(&text)
        } else {
            let opt = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
            let doc = roxmltree::Document::parse_with_options(&text, opt).unwrap();
            let key = doc.descendants().find(|n| n.text() == Some("ProgramArguments")).unwrap();
            let array = key.next_siblings().find(|n| n.has_tag_name("array")).unwrap();
            array.children().filter(|n| n.has_tag_name("string")).map(|n| n.text().unwrap().to_string()).collect()
        };
        let mut want = vec![BIN.to_string(), "--root".into(), odd_s.clone(), "serve".into()];
        want.extend(args.iter().map(|a| a.to_string()));
        assert_eq!(words, want, "{text}");
    }
}

/// The words of a unit's `ExecStart=` as systemd splits them (systemd.service(5), "Command
/// lines"): whitespace outside double quotes separates, `\\` and `\"` escape inside them, `%%` is
/// `%` and `$$` is `$`. Any other `%` or `$` would be a specifier or a variable: refused here.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
    let (mut words, mut cur, mut quoted, mut in_word) = (Vec::new(), String::new(), false, false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => cur.push(chars.next().expect("an escaped character")),
            '%' | '$' => {
                assert_eq!(chars.next(), Some(c), "an unescaped {c} in {line}");
                cur.push(c);
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "an unclosed quote in {line}");
    if in_word {
        words.push(cur);
    }
    words
}
