//! `rerankd serve`: the promoted rerankers over HTTP (TEI and Cohere/Jina rerank APIs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rerankd::model::device::DeviceChoice;
use rerankd::serve::{Options, Refused};
use rerankd::store::Root;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TCP address to listen on (default 127.0.0.1:8181 unless only --socket is given). A
    /// non-loopback address needs --api-key-file.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Also (or only) listen on this Unix socket, mode 0600.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A file holding the bearer token every endpoint but /health then requires.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Serve only this corpus (repeatable); default: every corpus with a home or promoted models.
    #[arg(long = "corpus")]
    pub corpora: Vec<String>,
    /// The corpus for requests that name none (TEI `/rerank`, a Cohere request without `model`).
    #[arg(long)]
    pub default_corpus: Option<String>,
    /// Base model for corpora with nothing promoted yet, and for `model: "base"`.
    #[arg(long, default_value = rerankd::job::DEFAULT_MODEL)]
    pub model: String,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// The precision of the products against the frozen weights: f32 (exact to the fixture
    /// tolerances), or bf16 (opt-in, CPUs with AVX512_BF16: faster, scores within about 1e-2;
    /// docs/performance.md has its ranking agreement).
    #[arg(long, default_value = "f32")]
    pub precision: rerankd::model::cpu::Precision,
    /// Capture every corpus's rankings as feedback events (else only corpora whose
    /// policy.json has `"capture": true`).
    #[arg(long)]
    pub capture: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: super::daemon::LogFormat,
}

pub fn run(root: &Root, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut corpora = Vec::new();
    for c in &a.corpora {
        match super::check_corpus(c) {
            Ok(c) => corpora.push(c),
            Err(code) => return Ok(code),
        }
    }
    let default_corpus = match a.default_corpus.as_deref().map(super::check_corpus).transpose() {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    super::daemon::init_logging(a.log_format);
    if let Err(why) = rerankd::model::cpu::set_precision(a.precision) {
        super::complain(why);
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    tracing::info!(precision = ?a.precision, "products against the frozen weights");
    let o = Options {
        listen: a.listen,
        socket: a.socket,
        api_key_file: a.api_key_file,
        corpora,
        default_corpus,
        model: a.model,
        device: a.device.open()?,
        capture: a.capture,
    };
    match rerankd::serve::run(root, o) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is::<rerankd::store::lock::Held>() || e.is::<Refused>() => {
            super::complain(format!("{e:#}"));
            Ok(ExitCode::from(super::EXIT_REFUSED))
        }
        Err(e) => Err(e),
    }
}
