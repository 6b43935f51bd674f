//! `on_finish` hooks: a command run by the daemon once a run's terminal state is recorded (the
//! job's `on_finish`, else config.toml's), through `sh -c`, with the run in its environment. It
//! runs in its own process group, its output goes to a file in the run directory, and the daemon
//! only polls it on its ticks: a hook that fails or hangs (killed, with its group, after
//! `on_finish_timeout_s`) never touches the run or delays the next one. Its exit status and output
//! tail become a `log` event of the run.

use crate::ids::RunId;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::job::Job;
use crate::store::atomic::read_json;
use crate::store::events::{Event, Hook, Level, Log};
use crate::store::paths::RunFiles;
use crate::store::{MetricsLog, Root, Status};

/// How often a running hook is looked at.
pub const HOOK_TICK: Duration = Duration::from_millis(250);
/// How much of a hook's output is kept in its log event.
const TAIL_BYTES: usize = 2000;

struct Running {
    run_id: RunId,
    command: String,
    child: Child,
    started: Instant,
    deadline: Instant,
}

#[derive(Default)]
pub struct Hooks {
    running: Vec<Running>,
}

impl Hooks {
    /// Starts the hook of a run that just reached its terminal state, if it has one.
    pub fn start(&mut self, root: &Root, run_id: &RunId, default: Option<&str>, timeout: Duration) {
        let files = RunFiles::new(&root.run_dir(run_id));
        let job: Option<Job> = read_json(&files.job()).ok();
        let Some(command) = job.as_ref().and_then(|j| j.on_finish.clone()).or_else(|| default.map(str::to_string))
        else {
            return;
        };
        let Ok(st) = Status::read(&files.status()) else { return };
        let summary = st.summary.clone().unwrap_or(Value::Null);
        let output = files.hook_log();
        let out = match files.create_hook_log() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(run_id = %run_id, "on_finish: cannot create {}: {e}", output.display());
                return;
            }
        };
        let err = match out.try_clone() {
            Ok(f) => f,
            Err(_) => return,
        };
        let text = |v: &Value| match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&command)
            .current_dir(&files.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RERANKD_RUN_ID", run_id)
            .env("RERANKD_STATE", st.state.as_str())
            .env("RERANKD_RUN_DIR", &files.dir)
            .env("RERANKD_CORPUS", &st.corpus)
            .env("RERANKD_PRIMARY_METRIC", text(&summary["primary_metric"]))
            .env("RERANKD_METRIC", text(&summary["candidate"]))
            .env("RERANKD_BASELINE", text(&summary["baseline"]))
            .env("RERANKD_PROMOTED", text(&summary["promoted"]))
            .process_group(0);
        match c.spawn() {
            Ok(child) => {
                tracing::info!(run_id = %run_id, pid = child.id(), "on_finish hook started");
                let now = Instant::now();
                self.running.push(Running {
                    run_id: run_id.clone(),
                    command,
                    child,
                    started: now,
                    deadline: now + timeout,
                });
            }
            Err(e) => record(
                root,
                run_id,
                Level::Warn,
                format!("on_finish hook could not start: {e}"),
                Hook { command, output_tail: None },
            ),
        }
    }

    /// Reaps hooks that ended and kills those past their deadline; records each in its run.
    pub fn poll(&mut self, root: &Root) {
        let mut i = 0;
        while i < self.running.len() {
            let h = &mut self.running[i];
            let outcome = match h.child.try_wait() {
                Ok(Some(status)) => Some(match status.code() {
                    Some(0) => (Level::Info, "exited 0".to_string()),
                    Some(c) => (Level::Warn, format!("exited {c}")),
                    None => (Level::Warn, format!("ended by a signal ({status})")),
                }),
                Ok(None) if Instant::now() >= h.deadline => {
                    // The whole group: `sh -c` and whatever it started.
                    let _ = crate::sys::signal_group(h.child.id(), libc::SIGKILL);
                    let _ = h.child.wait();
                    Some((Level::Warn, format!("killed after its timeout of {:?}", h.deadline - h.started)))
                }
                Ok(None) => None,
                Err(e) => Some((Level::Warn, format!("could not be waited for: {e}"))),
            };
            let Some((level, what)) = outcome else {
                i += 1;
                continue;
            };
            let h = self.running.remove(i);
            let tail = RunFiles::new(&root.run_dir(&h.run_id)).hook_log_tail(TAIL_BYTES);
            let secs = (h.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
            record(
                root,
                &h.run_id,
                level,
                format!("on_finish hook {what} after {secs} s"),
                Hook { command: h.command, output_tail: Some(tail) },
            );
        }
    }

    /// At daemon shutdown: hooks still running are killed (with their groups) and recorded.
    pub fn stop_all(&mut self, root: &Root) {
        for h in &mut self.running {
            h.deadline = Instant::now();
        }
        self.poll(root);
    }

    /// When the daemon must look again (while a hook runs).
    pub fn next_due(&self) -> Option<Instant> {
        (!self.running.is_empty()).then(|| Instant::now() + HOOK_TICK)
    }
}

fn record(root: &Root, run_id: &RunId, level: Level, message: String, hook: Hook) {
    tracing::info!(run_id = %run_id, "{message}");
    let files = RunFiles::new(&root.run_dir(run_id));
    let event = Event::Log(Log { hook: Some(hook), ..Log::new(level, message) });
    let logged = MetricsLog::open(&files.metrics(), run_id).and_then(|mut log| log.append(event));
    if let Err(e) = logged {
        tracing::error!(run_id = %run_id, error = %e, "recording the on_finish hook");
    }
}
