//! `promote RUN` and `rollback CORPUS`: change a corpus's current adapter by hand. Both take the
//! corpus lock, so they never race a run that is promoting.

use std::process::ExitCode;

use rerankd::store::paths::RunFiles;
use rerankd::store::{FileLock, Root, RunState, Status, models};
use serde_json::json;

fn lock(root: &Root, corpus: &str) -> anyhow::Result<Option<FileLock>> {
    root.ensure()?;
    let l = FileLock::try_acquire(&root.corpus_lock(corpus))?;
    if l.is_none() {
        eprintln!("rerankd: corpus `{corpus}` has an active run; try again when it has finished");
    }
    Ok(l)
}

pub fn promote(root: &Root, run: &str) -> anyhow::Result<ExitCode> {
    let files = RunFiles::new(&root.run_dir(run));
    let Ok(st) = Status::read(&files.status()) else {
        eprintln!("rerankd: no run `{run}`");
        return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
    };
    if st.state != RunState::Completed || !files.adapter().join("adapter_model.safetensors").is_file() {
        eprintln!("rerankd: run `{run}` is {} and has no adapter to promote", st.state.as_str());
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    let Some(_lock) = lock(root, &st.corpus)? else { return Ok(ExitCode::from(super::EXIT_REFUSED)) };
    let dest =
        models::promote(root, &st.corpus, run, &files.adapter(), "manual", json!({"reason": "promoted by hand"}))?;
    println!("{} now serves {run} ({})", st.corpus, dest.display());
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(root: &Root, corpus: &str) -> anyhow::Result<ExitCode> {
    let Some(_lock) = lock(root, corpus)? else { return Ok(ExitCode::from(super::EXIT_REFUSED)) };
    match models::rollback(root, corpus) {
        Ok((from, to)) => {
            println!("{corpus}: rolled back from {from} to {to}");
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            eprintln!("rerankd: {why}");
            Ok(ExitCode::from(super::EXIT_REFUSED))
        }
    }
}
