//! `rerankd feedback add`: a signal on a captured ranking, from a script, through the same
//! checks and the same locked append as serve's `POST /v1/feedback`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use rerankd::store::Root;
use rerankd::store::feedback::{CorpusFeedback, check_signal, find_event, signal_line};

#[derive(Subcommand, Debug)]
pub enum FeedbackCmd {
    /// Append a signal (thumbsup, thumbsdown, click, star1..star5) on a query event.
    Add(AddArgs),
}

#[derive(Args, Debug)]
pub struct AddArgs {
    #[arg(long)]
    pub corpus: String,
    /// The query event's id (a captured rerank response's `id`).
    #[arg(long)]
    pub event: String,
    #[arg(long)]
    pub signal: String,
    /// The document signalled, by id.
    #[arg(long)]
    pub doc: Option<String>,
    /// The document signalled, by its index in the request (as rerank results' `index`).
    #[arg(long)]
    pub index: Option<usize>,
}

pub fn run(root: &Root, cmd: FeedbackCmd) -> anyhow::Result<ExitCode> {
    let FeedbackCmd::Add(a) = cmd;
    let corpus = match super::check_corpus(&a.corpus) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let fb = CorpusFeedback::new(root, &corpus);
    let Some(ev) = find_event(&fb, &a.event)? else {
        super::complain(format!("no query event `{}` in {}", a.event, fb.feedback.display()));
        return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
    };
    let doc = match check_signal(&ev, &a.signal, a.index, a.doc.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            super::complain(e);
            return Ok(ExitCode::from(super::EXIT_FAILURE));
        }
    };
    let _lock = fb.lock()?;
    fb.append(&fb.feedback, &[signal_line(&a.event, &a.signal, doc.as_deref())])?;
    println!("{}", serde_json::json!({"corpus": a.corpus, "event_id": a.event, "signal": a.signal, "doc_id": doc}));
    Ok(ExitCode::SUCCESS)
}
