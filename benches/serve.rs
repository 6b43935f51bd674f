//! `cargo bench --bench serve -- [--config C] [--clients 1,8,32] [--docs 20] [--doc-tokens 200]
//!     [--capture off,on] [--feedback-mb 1024]`
//!
//! `rerankd serve` under load, side by side with the bare scoring forward on the same machine in
//! the same run. It writes a checkpoint of random weights of the config (default: the Qwen3-0.6B
//! shape) with the fixture's tokenizer, promotes a LoRA r16 q/k/v/o adapter for a corpus, starts
//! the real `rerankd serve` binary on loopback, and for each client count sends requests of
//! `--docs` documents of about `--doc-tokens` tokens from that many concurrent connections. Each
//! level is preceded by the bare forward (`Reranker::score_pairs` in this process, batches of 16,
//! the same adapter) over the same pairs (at most four requests' worth) while serve idles, so the
//! two alternate.
//! Prints one JSON line per level: pairs/s of both, their ratio, and p50/p95 request latency.
//! Each level runs with capture off and on (`policy.json` `capture`, read at each request).
//!
//! Then the lookups a client can trigger, at a feedback file of `--feedback-mb` (0: skipped):
//! corpus `bench` gets a feedback.jsonl of that size (query events of 20 documents, each with
//! three signals), serve is restarted on it, and the JSON line gives the first `/v1/models` (which
//! answers at once while serve builds the capture index in one pass) and the time until the
//! index is ready, then the medians of 20 `/v1/models`, 20 feedback
//! signals on a known event and 20 on unknown ids, and a small ranking's median latency meanwhile.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use rerankd::model::Reranker;
use rerankd::model::lora::LoraSet;
use serde_json::{Value, json};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = PathBuf::from(arg(
        &args,
        "--config",
        &here.join("tests/fixtures/qwen3-0.6b.config.json").display().to_string(),
    ));
    let clients: Vec<usize> = arg(&args, "--clients", "1,8,32").split(',').map(|c| c.parse().unwrap()).collect();
    let captures: Vec<bool> = arg(&args, "--capture", "off,on").split(',').map(|c| c == "on").collect();
    let feedback_mb: u64 = arg(&args, "--feedback-mb", "1024").parse()?;
    let n_docs: usize = arg(&args, "--docs", "20").parse()?;
    let doc_tokens: usize = arg(&args, "--doc-tokens", "200").parse()?;
    let tmp = tempfile::tempdir()?;
    let device = Device::Cpu;

    // A checkpoint of random weights and a promoted adapter for corpus `bench`.
    let t0 = Instant::now();
    let common::Setup { model: ck, root, adapter } = common::setup(&config, tmp.path())?;
    eprintln!("random {} checkpoint written in {:.1?}", config.display(), t0.elapsed());

    // Documents of about `doc_tokens` tokens each.
    let reranker = Reranker::load(&ck.display().to_string(), &device)?;
    let lora = LoraSet::load(&adapter, &reranker.model.cfg, &device)?;
    let words =
        ["retrieval", "passage", "ranking", "model", "query", "document", "relevance", "score", "token", "layer"];
    let docs: Vec<String> = (0..n_docs)
        .map(|i| {
            let mut d = String::new();
            let mut k = i;
            while reranker.prompt.encode_text(&d)?.len() < doc_tokens {
                d.push_str(words[k % words.len()]);
                d.push(' ');
                k = k * 7 + 3;
            }
            Ok(d)
        })
        .collect::<anyhow::Result<_>>()?;
    let query = "how are retrieved passages ranked by relevance";
    let pair_len = reranker.encode(query, &docs[0], 512)?.len();

    let mut serve = ServeProc::start(&root, &ck)?;
    let url = format!("{}/v1/rerank", serve.url);
    let body = json!({"model": "bench", "query": query, "documents": docs}).to_string();
    // Warm both (first forward allocates).
    reranker.score_pairs(&docs.iter().map(|d| (query, d.as_str())).collect::<Vec<_>>(), 512, 16, Some(&lora))?;
    post(&url, &body)?;

    let policy = root.join("corpora/bench/policy.json");
    std::fs::create_dir_all(policy.parent().unwrap())?;
    for (&c, &capture) in clients.iter().flat_map(|c| captures.iter().map(move |k| (c, k))) {
        std::fs::write(&policy, json!({"capture": capture}).to_string())?;
        // The bare forward over the same pairs (at most four requests' worth: past that the
        // batches are all full and the rate no longer changes), while serve idles.
        let pairs: Vec<(&str, &str)> = (0..c.min(4)).flat_map(|_| docs.iter().map(|d| (query, d.as_str()))).collect();
        let t = Instant::now();
        reranker.score_pairs(&pairs, 512, 16, Some(&lora))?;
        let bare = pairs.len() as f64 / t.elapsed().as_secs_f64();
        // Serve: c clients, one request each, at once.
        let lat = Arc::new(Mutex::new(Vec::new()));
        let t = Instant::now();
        let threads: Vec<_> = (0..c)
            .map(|_| {
                let (url, body, lat) = (url.clone(), body.clone(), lat.clone());
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let t = Instant::now();
                    post(&url, &body)?;
                    lat.lock().unwrap().push(t.elapsed().as_secs_f64());
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap()?;
        }
        let served = (c * n_docs) as f64 / t.elapsed().as_secs_f64();
        let mut lat = lat.lock().unwrap().clone();
        let line = json!({
            "clients": c, "capture": capture, "docs_per_request": n_docs, "tokens_per_pair": pair_len,
            "serve_pairs_per_s": round3(served), "bare_forward_pairs_per_s": round3(bare),
            "serve_over_bare": round3(served / bare),
            "latency_p50_s": round3(percentile(&mut lat, 0.5)), "latency_p95_s": round3(percentile(&mut lat, 0.95)),
            "threads": rayon::current_num_threads(),
        });
        println!("{line}");
    }
    serve.stop();
    if feedback_mb > 0 {
        lookups(&root, &ck, feedback_mb, query, &docs[..2])?;
    }
    Ok(())
}

/// The lookups a client can trigger at a feedback file of `mb` megabytes (see the header).
fn lookups(root: &Path, model: &Path, mb: u64, query: &str, docs: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    let home = root.join("corpora/bench");
    std::fs::write(home.join("policy.json"), json!({"capture": true}).to_string())?;
    let _ = std::fs::remove_file(home.join("feedback.index"));
    let t = Instant::now();
    let mut f = std::io::BufWriter::new(std::fs::File::create(home.join("feedback.jsonl"))?);
    let (mut written, mut events) = (0u64, 0u64);
    let mut known = String::new();
    while written < mb << 20 {
        let id = format!("{:032x}", rand::random::<u128>());
        let ids: Vec<String> = (0..20).map(|d| format!("kb/{}", (events * 7 + d) % 100_000)).collect();
        let adapter = if events % 2 == 0 { "base" } else { "bench__20261127_120000" };
        let mut block = json!({"event_id": id, "ts": "2026-12-03T00:00:00Z", "query": format!("query number {events}"),
                               "shown": &ids[..10], "documents": ids, "adapter": adapter})
        .to_string();
        block.push('\n');
        for (k, sig) in ["click", "thumbsup", "thumbsdown"].iter().enumerate() {
            block.push_str(
                &json!({"event_id": id, "ts": "2026-12-03T00:00:01Z", "signal": sig, "doc_id": format!("kb/{}", (events * 7 + k as u64) % 100_000)})
                    .to_string(),
            );
            block.push('\n');
        }
        f.write_all(block.as_bytes())?;
        written += block.len() as u64;
        events += 1;
        if events == 1000 {
            known = id;
        }
    }
    f.flush()?;
    drop(f);
    eprintln!("feedback.jsonl: {} MB, {events} events, written in {:.1?}", written >> 20, t.elapsed());
    let serve = ServeProc::start(root, model)?;
    let get = |path: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3600))).build(),
        );
        let mut r = agent.get(format!("{}{path}", serve.url)).call()?;
        let _ = r.body_mut().read_to_string()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let signal = |id: &str| -> anyhow::Result<(f64, u16)> {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(3600)))
                .build(),
        );
        let t = Instant::now();
        let body = json!({"id": id, "signal": "click", "corpus": "bench"}).to_string();
        let r =
            agent.post(format!("{}/v1/feedback", serve.url)).header("Content-Type", "application/json").send(body)?;
        Ok((t.elapsed().as_secs_f64(), r.status().as_u16()))
    };
    let first = get("/v1/models")?;
    // The index reads the file once (serve starts that at launch); `/v1/models` does not wait for
    // it (`online_pending`): the time until its counts appear.
    let t = Instant::now();
    let online = || -> anyhow::Result<bool> {
        let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().build());
        let v: Value =
            serde_json::from_str(&agent.get(format!("{}/v1/models", serve.url)).call()?.body_mut().read_to_string()?)?;
        Ok(v["data"].as_array().into_iter().flatten().any(|m| m["id"] == "bench" && m["online"].is_object()))
    };
    while !online()? {
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = t.elapsed().as_secs_f64() + first;
    let index_mb = std::fs::metadata(home.join("feedback.index")).map(|m| m.len() >> 20).unwrap_or(0);
    let mut models: Vec<f64> = (0..20).map(|_| get("/v1/models")).collect::<anyhow::Result<_>>()?;
    let mut hits = Vec::new();
    for _ in 0..20 {
        let (t, status) = signal(&known)?;
        anyhow::ensure!(status == 200, "a signal on a known event: {status}");
        hits.push(t);
    }
    let mut misses = Vec::new();
    for _ in 0..20 {
        let (t, status) = signal(&format!("{:032x}", rand::random::<u128>()))?;
        anyhow::ensure!(status == 404, "a signal on an unknown event: {status}");
        misses.push(t);
    }
    let url = format!("{}/v1/rerank", serve.url);
    let body = json!({"model": "bench", "query": query, "documents": docs}).to_string();
    let mut small = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        post(&url, &body)?;
        small.push(t.elapsed().as_secs_f64());
    }
    let rss = rerankd::sys::process_memory_mb(serve.child.id()).unwrap_or(0);
    let line = json!({
        "feedback_mb": written >> 20, "events": events, "first_models_s": round3(first),
        "index_ready_s": round3(ready), "index_mb": index_mb,
        "models_p50_ms": round3(percentile(&mut models, 0.5) * 1e3),
        "feedback_known_p50_ms": round3(percentile(&mut hits, 0.5) * 1e3),
        "feedback_unknown_p50_ms": round3(percentile(&mut misses, 0.5) * 1e3),
        "small_ranking_p50_s": round3(percentile(&mut small, 0.5)), "serve_rss_mb": rss,
    });
    println!("{line}");
    let mut serve = serve;
    serve.stop();
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn post(url: &str, body: &str) -> anyhow::Result<Value> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3600))).build(),
    );
    let mut r = agent.post(url).header("Content-Type", "application/json").send(body)?;
    let v: Value = serde_json::from_str(&r.body_mut().with_config().limit(64 << 20).read_to_string()?)?;
    anyhow::ensure!(v["results"].is_array(), "unexpected answer: {v}");
    Ok(v)
}

struct ServeProc {
    child: Child,
    url: String,
}

impl ServeProc {
    fn start(root: &Path, model: &Path) -> anyhow::Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_rerankd"))
            .arg("--root")
            .arg(root)
            .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu", "--model"])
            .arg(model)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(root.join("serve.json"))
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(url) = v["listen"].as_str()
            {
                return Ok(Self { child, url: url.to_string() });
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "serve did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        let _ = rerankd::sys::signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}
