//! `promote RUN` and `rollback CORPUS`: change a corpus's current adapter by hand. Both take the
//! corpus lock, so they never race a run that is promoting.

use std::process::ExitCode;

use rerankd::ids::CorpusName;
use rerankd::store::{FileLock, Root, RunState, models};
use serde_json::json;

fn lock(root: &Root, corpus: &CorpusName) -> anyhow::Result<Option<FileLock>> {
    root.ensure()?;
    let l = FileLock::try_acquire(&root.corpus_lock(corpus))?;
    if l.is_none() {
        super::complain(format!("corpus `{corpus}` has an active run; try again when it has finished"));
    }
    Ok(l)
}

pub fn promote(root: &Root, run: &str) -> anyhow::Result<ExitCode> {
    let (files, st) = match super::find_run(root, run) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    if st.state != RunState::Completed || !files.adapter().join("adapter_model.safetensors").is_file() {
        super::complain(format!("run `{run}` is {} and has no adapter to promote", st.state.as_str()));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    let Some(_lock) = lock(root, &st.corpus)? else { return Ok(ExitCode::from(super::EXIT_REFUSED)) };
    models::reconcile(root, &st.corpus)?;
    let dest = models::promote(
        root,
        &st.corpus,
        &st.run_id,
        &files.adapter(),
        "manual",
        json!({"reason": "promoted by hand"}),
    )?;
    super::say(
        format!("{} now serves {run} ({})", st.corpus, dest.display()),
        json!({"corpus": st.corpus, "current": run, "path": dest}),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(root: &Root, corpus: &str) -> anyhow::Result<ExitCode> {
    let corpus = match super::check_corpus(corpus) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let corpus = &corpus;
    if !root.models(corpus).is_dir() {
        super::complain(format!("corpus `{corpus}` has no promoted adapter"));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    let Some(_lock) = lock(root, corpus)? else { return Ok(ExitCode::from(super::EXIT_REFUSED)) };
    match models::rollback(root, corpus) {
        Ok((from, to)) => {
            super::say(
                format!("{corpus}: rolled back from {from} to {to}"),
                json!({"corpus": corpus, "from": from, "to": to}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(models::RollbackError::Store(e)) => Err(e.into()),
        Err(why) => {
            super::complain(why);
            Ok(ExitCode::from(super::EXIT_REFUSED))
        }
    }
}
