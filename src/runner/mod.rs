//! One run, in its own process (`rerankd run <run_dir>`): takes the corpus lock and holds it to
//! its last write, loads the model, materialises the training pairs, trains, saves the adapter,
//! and records every state change. A crash here costs this run only; the daemon records it.

mod context;
mod data;
mod pipeline;
mod plan;
mod saved;

pub use context::RunContext;
use pipeline::execute;
pub use saved::write_checkpoint;

use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::store::checkpoint;
use crate::store::models;
use crate::store::paths::RunFiles;
use crate::store::{self, FileLock, MetricsLog, Root, RunState, Status};
use crate::testhooks;
use crate::train::Cancelled;

/// Entry point of `rerankd run`. Returns the process exit code, 0, once the run has recorded its
/// terminal state itself (completed, failed or cancelled); an error only when it could not even
/// read or write its own files (the daemon then records the death, with this error as the
/// process's last words). `nice`: the CPU priority to lower itself to first.
pub fn run(root: &Root, run_dir: &Path, nice: Option<i32>) -> anyhow::Result<i32> {
    if let Some(n) = nice
        && let Err(e) = crate::sys::lower_priority(n)
    {
        eprintln!("rerankd run: could not lower priority to nice {n}: {e}");
    }
    let files = RunFiles::new(run_dir);
    let status = Status::read(&files.status())?;
    if status.state.is_terminal() {
        return Ok(0);
    }
    let ignore_cancel = testhooks::ignore_cancel();
    let terminated = Arc::new(AtomicBool::new(false));
    if ignore_cancel {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    } else {
        // A SIGTERM (the daemon's escalation, or a service manager signalling the whole group)
        // ends the run at its next boundary, recorded, rather than mid-write.
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&terminated))?;
        }
    }
    let lock_path = root.corpus_lock(&status.corpus);
    let log = MetricsLog::open(&files.metrics(), &status.run_id)?;
    let mut ctx = RunContext { files, status, log, ignore_cancel, terminated };
    // The daemon starts a run only when the lock is free, but a `promote`/`rollback` by hand may
    // hold it for a moment: wait a little before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut lock = loop {
        if let Some(l) = FileLock::try_acquire(&lock_path)? {
            break l;
        }
        if std::time::Instant::now() >= deadline {
            let msg =
                format!("corpus `{}` stayed locked by another process ({})", ctx.status.corpus, lock_path.display());
            ctx.set_state(RunState::Failed, None, Some(msg))?;
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    lock.write_pid()?;
    // Evidence of memory pressure in the last attempt (an older status says only `shrink_memory`).
    let shrink = std::mem::take(&mut ctx.status.shrink_memory).then(|| {
        std::mem::take(&mut ctx.status.memory_evidence).unwrap_or_else(|| "its death looked like memory".into())
    });
    ctx.status.needs_space_mb = None;
    ctx.set_state(RunState::Running, None, None)?;
    testhooks::crash_point("run.after_running");
    let _ballast: Vec<u8> = testhooks::alloc_mb().map(|mb| vec![1u8; mb << 20]).unwrap_or_default();
    let outcome = execute(&mut ctx, root, shrink);
    let result = match outcome {
        Ok(summary) => {
            ctx.status.summary = Some(summary);
            let r = ctx.set_state(RunState::Completed, None, None);
            checkpoint::remove(&ctx.files);
            r
        }
        Err(e) => {
            // A run that promoted itself and then did not complete must not stay current (an
            // attempt that resumes promotes again if it gets that far).
            let why = format!("{} did not complete", ctx.status.run_id);
            if let Err(u) = models::undo(root, &ctx.status.corpus, &ctx.status.run_id, &why) {
                eprintln!("rerankd run: undoing the promotion: {u}");
            }
            if disk_full(&e) {
                return Ok(wait_for_space(&mut ctx, root, &e));
            }
            // The strongest request standing now wins over the one that stopped the run (a
            // cancel that came while it was pausing is still a cancel).
            let stopped = e.downcast_ref::<Cancelled>().map(|Cancelled(seen)| {
                ctx.files.stop_request(Some(ctx.status.attempt)).unwrap_or_else(|| seen.clone())
            });
            match stopped.as_ref().map(|req| (req, req.outcome())) {
                Some((req, kind @ (RunState::Queued | RunState::Paused))) => {
                    let at = match checkpoint::latest::<checkpoint::Header>(&ctx.files) {
                        Some((_, Ok(h))) => format!("at step {}; resumes from its checkpoint", h.cursor.step),
                        _ => "before its first checkpoint; starts over".to_string(),
                    };
                    let why = if kind == RunState::Paused {
                        format!("paused {at}")
                    } else {
                        format!("interrupted ({req}) {at}")
                    };
                    let r = ctx.set_state(kind, Some(why), None);
                    // The request is answered: a resumed run must not stop on it again.
                    ctx.files.clear_pause();
                    ctx.files.clear_shutdown();
                    r
                }
                Some((req, _)) => {
                    checkpoint::remove(&ctx.files);
                    ctx.set_state(RunState::Cancelled, Some(req.reason().to_string()), None)
                }
                None => {
                    checkpoint::remove(&ctx.files);
                    ctx.set_state(RunState::Failed, None, Some(format!("{e:#}")))
                }
            }
        }
    };
    drop(lock); // after the last write
    result.map(|_| 0)
}

/// Whether the disk refused a write anywhere in the error's chain (`sys::is_disk_full`): the
/// store's errors, plain I/O errors, and candle's (a tensor file being saved).
fn disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<store::StoreError>().is_some_and(store::StoreError::is_disk_full)
            || c.downcast_ref::<std::io::Error>().is_some_and(crate::sys::is_disk_full)
            || c.downcast_ref::<candle_core::Error>().is_some_and(candle_disk_full)
    })
}

fn candle_disk_full(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::Io(io) => crate::sys::is_disk_full(io),
        candle_core::Error::WithBacktrace { inner, .. } | candle_core::Error::Context { inner, .. } => {
            candle_disk_full(inner)
        }
        _ => false,
    }
}

/// A run that met a full disk keeps its checkpoints and goes back in line, to resume from the
/// latest once [`checkpoint::space_needed_mb`] are free on the root's file system (the daemon
/// checks before starting it). Returns the exit status: 0 when recorded, [`store::EXIT_DISK_FULL`]
/// when even that could not be written (the daemon then records it).
fn wait_for_space(ctx: &mut RunContext, root: &Root, e: &anyhow::Error) -> i32 {
    let need = checkpoint::space_needed_mb(&ctx.files);
    let at = match checkpoint::latest::<checkpoint::Header>(&ctx.files) {
        Some((_, Ok(h))) => format!("resumes from its checkpoint at step {}", h.cursor.step),
        _ => "starts over (no checkpoint yet)".to_string(),
    };
    let why = format!("the disk is full ({e:#}); {at} once {need} MB are free on {}", root.dir.display());
    ctx.status.needs_space_mb = Some(need);
    match ctx.set_state(RunState::Queued, Some(why), None) {
        Ok(()) => 0,
        Err(e2) => {
            eprintln!("rerankd run: the disk is full and the run could not record it: {e2:#}");
            store::EXIT_DISK_FULL
        }
    }
}
