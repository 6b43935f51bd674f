//! `rerankd demo`: the whole path on the shipped demo corpus (examples/demo) with the tiny fixture
//! model: a fresh root under target/, the job dropped into the spool, the daemon run until idle,
//! then the trained adapter scoring a query against the base model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rerankd::model::Reranker;
use rerankd::model::device::DeviceChoice;
use rerankd::model::reranker::SCORE_BATCH;
use rerankd::store::paths::RunFiles;
use rerankd::store::{Root, Status};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo's state root goes (wiped first).
    #[arg(long, default_value = "target/demo-root")]
    pub demo_root: PathBuf,
}

fn repo_dir() -> PathBuf {
    let here = PathBuf::from(".");
    if here.join("examples/demo/job.json").is_file() { here } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")) }
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    super::daemon::init_logging(super::daemon::LogFormat::Text);
    let repo = std::fs::canonicalize(repo_dir())?;
    let demo = repo.join("examples/demo");
    if a.demo_root.exists() {
        std::fs::remove_dir_all(&a.demo_root).with_context(|| format!("clearing {}", a.demo_root.display()))?;
    }
    let root = Root { dir: a.demo_root.clone() };
    root.ensure()?;
    let corpus = rerankd::ids::CorpusName::parse("demo")?;
    let home = root.corpus_home(&corpus);
    std::fs::create_dir_all(&home)?;
    for f in ["documents.jsonl", "feedback.jsonl"] {
        std::fs::copy(demo.join(f), home.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let mut job: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(demo.join("job.json"))?)?;
    // The shipped job names the fixture model relative to the repository.
    let model = repo.join(job["model"].as_str().unwrap_or("tests/fixtures/tiny-qwen3"));
    job["model"] = model.display().to_string().into();
    rerankd::store::spool::drop_job(&root, "demo.json", serde_json::to_string_pretty(&job)?.as_bytes())?;
    println!("dropped demo.json into {}; running the daemon until the run is done...", root.spool().display());
    rerankd::daemon::run(&root, true)?;
    let receipt: rerankd::store::spool::Receipt<serde_json::Value> =
        rerankd::store::spool::read_receipt(&root, "demo.json").context("the demo job was not accepted")?;
    let run_id = receipt.run_id;
    let files = RunFiles::new(&root.run_dir(&run_id));
    let st = Status::read(&files.status())?;
    println!("\nrun {run_id}: {}", st.state.as_str());
    if let Some(s) = &st.summary {
        println!("summary: {s}");
    }
    if let Some(e) = &st.error {
        println!("error: {e}");
    }
    println!("events: {}", files.metrics().display());
    println!("report: {}", files.report().display());
    for e in rerankd::store::metrics::read_events(&files.metrics())? {
        use rerankd::store::Event;
        match e.event {
            Event::Eval(ev) => {
                let which = serde_json::to_value(ev.which)?;
                println!("eval {:<9} {}", which.as_str().unwrap_or(""), serde_json::to_string(&ev.metrics)?)
            }
            Event::Promote(p) => println!("promote: {} ({})", p.promoted, p.reason),
            _ => {}
        }
    }
    if let Some((id, dir)) = rerankd::store::models::current(&root, &corpus) {
        println!("models/demo/current -> {id}");
        show_scores(&model, &dir)?;
    }
    println!(
        "\nThe tiny random model only learns the demo's patterns. For a useful reranker, set \"model\" in the job\n\
         to a real checkpoint: \"Qwen/Qwen3-Reranker-0.6B\" (from your Hugging Face cache) or a Qwen3 directory."
    );
    Ok(if st.state == rerankd::store::RunState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

fn show_scores(model: &Path, adapter: &Path) -> anyhow::Result<()> {
    let device = DeviceChoice::Cpu.open()?;
    let r = Reranker::load(&model.display().to_string(), &device)?;
    let adapter = rerankd::store::models::Adapter::open(adapter)?;
    let lora = adapter.lora(&r.model.cfg, &device)?;
    let q = "how does espresso work";
    let docs = [
        "Guide to espresso. Espresso is brewed by forcing hot water at high pressure through finely ground coffee.",
        "BUY CHEAP ESPRESSO DEALS NOW!!! Limited offer, click here, free shipping!!!",
        "re: espresso lol same here +1 anyone?? bump",
    ];
    // Score as the run evaluated: its max_length, from the adapter's manifest.
    let max_length = adapter.max_length().context("manifest without max_length")?;
    let pairs: Vec<(&str, &str)> = docs.iter().map(|d| (q, *d)).collect();
    let base = r.score_pairs(&pairs, max_length, SCORE_BATCH, None)?;
    let tuned = r.score_pairs(&pairs, max_length, SCORE_BATCH, Some(&lora))?;
    println!("\nquery: {q}\n{:>8} {:>8}  document", "base", "adapter");
    for (i, d) in docs.iter().enumerate() {
        println!("{:>8.4} {:>8.4}  {d}", base[i].score, tuned[i].score);
    }
    Ok(())
}
