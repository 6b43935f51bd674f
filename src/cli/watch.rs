//! `rerankd watch RUN`: follow a run's metrics.jsonl; exits when the run reaches a terminal state
//! (0 completed, 1 failed, 5 cancelled). On a terminal, an in-place progress bar (indicatif) with
//! step/total, loss, lr, peak memory, ETA and the latest evaluation, with the other events printed
//! above it; in a pipe, one plain line per step and per event; with `--json`, the events as they
//! are.

use rerankd::ids::{CorpusName, RunId};
use std::io::{BufRead, BufReader, IsTerminal, Seek, SeekFrom};
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rerankd::store::{Event, Logged, Root, RunState, Status};
use serde_json::Value;

/// `watch --corpus C`: the corpus's run to follow: one not yet ended, else the next one created.
fn next_run_of(root: &Root, corpus: &CorpusName) -> String {
    let before: Vec<RunId> = rerankd::store::all_runs(root).into_iter().map(|s| s.run_id).collect();
    loop {
        let runs = rerankd::store::all_runs(root);
        let mine = runs.iter().filter(|s| &s.corpus == corpus);
        if let Some(s) = mine.clone().filter(|s| !s.state.is_terminal()).min_by(|a, b| a.created_at.cmp(&b.created_at))
        {
            return s.run_id.to_string();
        }
        if let Some(s) = mine.filter(|s| !before.contains(&s.run_id)).min_by(|a, b| a.created_at.cmp(&b.created_at)) {
            return s.run_id.to_string();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn run(root: &Root, run: Option<&str>, corpus: Option<&str>) -> anyhow::Result<ExitCode> {
    let run = match (run, corpus) {
        (Some(r), _) => r.to_string(),
        (None, Some(c)) => {
            let c = match super::check_corpus(c) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let r = next_run_of(root, &c);
            if !super::json() {
                println!("following {r}");
            }
            r
        }
        (None, None) => unreachable!("clap requires a run or --corpus"),
    };
    let run = run.as_str();
    let files = match super::find_run(root, run) {
        Ok((files, _)) => files,
        Err(code) => return Ok(code),
    };
    let mut pos = 0u64;
    let primary = rerankd::store::atomic::read_json::<Value>(&files.job())
        .ok()
        .and_then(|j| j["eval"]["primary_metric"].as_str().map(str::to_string))
        .unwrap_or_else(|| "ndcg@10".into());
    let mut view = View::new(primary, std::io::stdout().is_terminal());
    loop {
        // Read before the log: the terminal event is written before status.json, so a terminal
        // status seen here means its event (if any) is in the log read below.
        let ended = Status::read(&files.status()).ok().filter(|st| st.state.is_terminal());
        let mut f = std::fs::File::open(files.metrics())?;
        f.seek(SeekFrom::Start(pos))?;
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break; // a line still being written: read it whole next time
            }
            pos += line.len() as u64;
            if let Ok(e) = serde_json::from_str::<Logged>(&line) {
                // --json: the run's events as they are, one a line, from the start.
                let code = if super::json() {
                    println!("{}", line.trim_end());
                    terminal_code(&e)
                } else {
                    view.show(&e)
                };
                if let Some(code) = code {
                    return Ok(ExitCode::from(code));
                }
            }
            line.clear();
        }
        // At the end of the log: a run whose status.json is terminal although no terminal
        // event was read (a log from an older build, or a state recorded while the log could not
        // be written) ends here too, so watch never waits for an event that will not come.
        if let Some(st) = ended {
            view.finish();
            let reason = st.reason.as_deref().or(st.error.as_deref()).unwrap_or("");
            super::say(
                format!("{} ({reason}; from status.json)", st.state.as_str()),
                serde_json::json!({"run_id": run, "type": "state", "state": st.state.as_str(), "reason": reason, "from": "status.json"}),
            );
            return Ok(ExitCode::from(exit_code(st.state)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A duration in few characters: 42s, 3m12s, 2h05m.
fn compact(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The exit code for a run that ended in `state`: 0 completed, 1 failed, 5 cancelled.
fn exit_code(state: RunState) -> u8 {
    match state {
        RunState::Completed => 0,
        RunState::Cancelled => super::EXIT_CANCELLED,
        _ => super::EXIT_FAILURE,
    }
}

/// The exit code of a terminal `state` event.
fn terminal_code(e: &Logged) -> Option<u8> {
    e.event.state().filter(|s| s.is_terminal()).map(exit_code)
}

/// What watch shows of a run: plain lines, or on a terminal a progress bar with the other events
/// printed above it.
struct View {
    primary: String,
    total: Option<u64>,
    step_ms: Vec<f64>,
    bar: Option<ProgressBar>,
    /// The latest evaluation of the primary metric, for the bar.
    last_eval: Option<String>,
}

impl View {
    fn new(primary: String, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                    .expect("a fixed template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { primary, total: None, step_ms: Vec::new(), bar, last_eval: None }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    /// Takes the bar off the terminal, leaving the lines printed above it.
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Seconds left, from the median of the last 20 step times.
    fn eta_s(&self, step: u64) -> Option<f64> {
        let t = self.total.filter(|&t| t > 0)?;
        let mut recent = self.step_ms[self.step_ms.len().saturating_sub(20)..].to_vec();
        recent.sort_by(f64::total_cmp);
        Some(recent.get(recent.len() / 2)? * t.saturating_sub(step) as f64 / 1e3)
    }

    /// Shows one event; returns an exit code when the run is over.
    fn show(&mut self, e: &Logged) -> Option<u8> {
        let ts = e.ts.get(11..19).unwrap_or("");
        match &e.event {
            Event::Log(l) => {
                if let Some(t) = l.total_steps {
                    self.total = Some(t);
                    if let Some(bar) = &self.bar {
                        bar.set_length(t);
                    }
                }
                self.line(format!("{ts} {}", l.message));
            }
            Event::FeedbackSnapshot(s) => self.line(format!("{ts} {}", s.message)),
            Event::Step(s) => {
                let step = s.step + 1;
                self.step_ms.push(s.step_time_ms);
                let eta = self.eta_s(step);
                let (loss, lr) = (s.loss, s.lr);
                if let Some(bar) = &self.bar {
                    bar.set_position(step);
                    let mut msg = format!("ep {} · loss {loss:.4} · lr {lr:.1e}", s.epoch + 1);
                    if let Some(mb) = s.peak_mem_mb {
                        msg += &format!(" · {mb} MB");
                    }
                    if let Some(s) = eta {
                        msg += &format!(" · ETA {}", compact(s));
                    }
                    if let Some(ev) = &self.last_eval {
                        msg += &format!(" · {ev}");
                    }
                    bar.set_message(msg);
                    return None;
                }
                let progress = match self.total {
                    Some(t) if t > 0 => {
                        let filled = (20 * step / t) as usize;
                        format!("[{}{}] {step}/{t}", "#".repeat(filled.min(20)), ".".repeat(20 - filled.min(20)))
                    }
                    _ => format!("step {step}"),
                };
                let eta = eta.map(|s| format!("ETA {s:.0}s")).unwrap_or_default();
                println!(
                    "{ts} {progress} epoch {} loss {loss:.4} lr {lr:.2e} grad {:.3} {:.0} ms {eta}",
                    s.epoch, s.grad_norm, s.step_time_ms
                );
            }
            Event::Eval(ev) => {
                let which = serde_json::to_value(ev.which).ok();
                let which = which.as_ref().and_then(Value::as_str).unwrap_or("");
                if let Some(m) = ev.metrics.get(&self.primary) {
                    let at = match ev.epoch {
                        Some(ep) => format!("ep {}", ep + 1),
                        None => which.to_string(),
                    };
                    self.last_eval = Some(format!("{} {m:.4} ({at})", self.primary));
                }
                self.line(format!("{ts} eval {which} {}", serde_json::to_string(&ev.metrics).unwrap_or_default()));
            }
            Event::Promote(p) => self.line(format!("{ts} promoted: {} ({})", p.promoted, p.reason)),
            Event::Cap(c) => self.line(format!("{ts} cap: {} {} -> {} ({})", c.field, c.from, c.to, c.why)),
            Event::Error { message } => self.line(format!("{ts} error: {message}")),
            Event::State { state, reason, .. } => {
                let code = state.is_terminal().then(|| exit_code(*state));
                if code.is_some() {
                    self.finish();
                }
                match reason {
                    Some(r) => self.line(format!("{ts} {} ({r})", state.as_str())),
                    None => self.line(format!("{ts} {}", state.as_str())),
                }
                return code;
            }
            Event::Checkpoint(_) | Event::Other => {}
        }
        None
    }
}
