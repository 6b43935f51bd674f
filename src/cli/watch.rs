//! `rerankd watch RUN`: follow a run's metrics.jsonl: one line per step with loss, learning rate,
//! progress and ETA, evaluation and promotion results; exits when the run reaches a terminal
//! state (0 completed, 1 failed, 5 cancelled).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::process::ExitCode;
use std::time::Duration;

use rerankd::store::{Root, RunState, Status};
use serde_json::Value;

/// `watch --corpus C`: the corpus's run to follow: one not yet ended, else the next one created.
fn next_run_of(root: &Root, corpus: &str) -> String {
    let before: Vec<String> = rerankd::store::all_runs(root).into_iter().map(|s| s.run_id).collect();
    loop {
        let runs = rerankd::store::all_runs(root);
        let mine = runs.iter().filter(|s| s.corpus == corpus);
        if let Some(s) = mine.clone().filter(|s| !s.state.is_terminal()).min_by(|a, b| a.created_at.cmp(&b.created_at))
        {
            return s.run_id.clone();
        }
        if let Some(s) = mine.filter(|s| !before.contains(&s.run_id)).min_by(|a, b| a.created_at.cmp(&b.created_at)) {
            return s.run_id.clone();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn run(root: &Root, run: Option<&str>, corpus: Option<&str>) -> anyhow::Result<ExitCode> {
    let run = match (run, corpus) {
        (Some(r), _) => r.to_string(),
        (None, Some(c)) => {
            if let Err(code) = super::check_corpus(c) {
                return Ok(code);
            }
            let r = next_run_of(root, c);
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
    let mut total: Option<u64> = None;
    let mut step_ms: Vec<f64> = Vec::new();
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
            if let Ok(e) = serde_json::from_str::<Value>(&line) {
                // --json: the run's events as they are, one a line, from the start.
                let code = if super::json() {
                    println!("{e}");
                    terminal_code(&e)
                } else {
                    show(&e, &mut total, &mut step_ms)
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

/// The exit code for a run that ended in `state`: 0 completed, 1 failed, 5 cancelled.
fn exit_code(state: RunState) -> u8 {
    match state {
        RunState::Completed => 0,
        RunState::Cancelled => super::EXIT_CANCELLED,
        _ => super::EXIT_FAILURE,
    }
}

/// The exit code of a terminal `state` event.
fn terminal_code(e: &Value) -> Option<u8> {
    (e["type"] == "state")
        .then(|| RunState::parse(e["state"].as_str()?))
        .flatten()
        .filter(|s| s.is_terminal())
        .map(exit_code)
}

/// Prints one event; returns an exit code when the run is over.
fn show(e: &Value, total: &mut Option<u64>, step_ms: &mut Vec<f64>) -> Option<u8> {
    let ts = e["ts"].as_str().unwrap_or("").get(11..19).unwrap_or("");
    match e["type"].as_str()? {
        "log" => {
            if let Some(t) = e["total_steps"].as_u64() {
                *total = Some(t);
            }
            println!("{ts} {}", e["message"].as_str().unwrap_or(""));
        }
        "step" => {
            let step = e["step"].as_u64().unwrap_or(0) + 1;
            step_ms.push(e["step_time_ms"].as_f64().unwrap_or(0.0));
            let (bar, eta) = match *total {
                Some(t) if t > 0 => {
                    let mut recent = step_ms[step_ms.len().saturating_sub(20)..].to_vec();
                    recent.sort_by(f64::total_cmp);
                    let eta_s = recent[recent.len() / 2] * t.saturating_sub(step) as f64 / 1e3;
                    let filled = (20 * step / t) as usize;
                    (
                        format!("[{}{}] {step}/{t}", "#".repeat(filled), ".".repeat(20 - filled.min(20))),
                        format!("ETA {eta_s:.0}s"),
                    )
                }
                _ => (format!("step {step}"), String::new()),
            };
            println!(
                "{ts} {bar} epoch {} loss {:.4} lr {:.2e} grad {:.3} {:.0} ms {eta}",
                e["epoch"],
                e["loss"].as_f64().unwrap_or(f64::NAN),
                e["lr"].as_f64().unwrap_or(0.0),
                e["grad_norm"].as_f64().unwrap_or(0.0),
                e["step_time_ms"].as_f64().unwrap_or(0.0)
            );
        }
        "eval" => println!("{ts} eval {} {}", e["which"].as_str().unwrap_or(""), e["metrics"]),
        "promote" => println!("{ts} promoted: {} ({})", e["promoted"], e["reason"].as_str().unwrap_or("")),
        "error" => println!("{ts} error: {}", e["message"].as_str().unwrap_or("")),
        "state" => {
            let state = e["state"].as_str().unwrap_or("");
            match e["reason"].as_str() {
                Some(r) => println!("{ts} {state} ({r})"),
                None => println!("{ts} {state}"),
            }
            return RunState::parse(state).filter(|s| s.is_terminal()).map(exit_code);
        }
        _ => {}
    }
    None
}
