//! What every integration test of the daemon needs: a fresh root with a small triplets file,
//! the real binary, job drops, waits with timeouts, events and statuses. The daemon's stderr goes
//! to `daemon.log` beside the root and is printed when a test fails, with every run's status.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_rerankd");

pub fn fixture_model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3").display().to_string()
}

pub struct Root {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Root {
    pub fn new(config: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("root");
        for d in ["spool/tmp", "corpora"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let triplets: String = (0..16)
            .map(|i| {
                json!({"query": format!("q{i}"), "positive": format!("answer {i}"), "negatives": ["noise", "other"]})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(tmp.path().join("triplets.jsonl"), triplets).unwrap();
        Self { _tmp: tmp, dir }
    }

    pub fn triplets(&self) -> String {
        self.dir.parent().unwrap().join("triplets.jsonl").display().to_string()
    }

    pub fn job(&self, corpus: &str, epochs: u64) -> Value {
        json!({"corpus": corpus, "model": fixture_model(), "data": {"triplets": self.triplets()},
               "train": {"epochs": epochs, "batch_size": 4, "max_length": 128, "lr": 1e-3}, "device": "cpu"})
    }

    /// Maildir-style drop: write in spool/tmp, rename into spool/.
    pub fn drop_job(&self, name: &str, job: &Value) {
        let tmp = self.dir.join("spool/tmp").join(name);
        std::fs::write(&tmp, job.to_string()).unwrap();
        std::fs::rename(tmp, self.dir.join("spool").join(name)).unwrap();
    }

    pub fn daemon(&self) -> Child {
        self.daemon_env(&[])
    }

    pub fn daemon_env(&self, env: &[(&str, &str)]) -> Child {
        let mut c = self.cli_cmd(["daemon"]);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn().unwrap()
    }

    /// Drops a job and waits for its receipt: the run id.
    pub fn submit(&self, name: &str, job: &Value) -> String {
        self.drop_job(name, job);
        run_id_of(self, name)
    }

    /// `rerankd --root ROOT <args>`.
    pub fn cli_cmd<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(&self.dir).args(args);
        c
    }

    pub fn receipt(&self, name: &str) -> Option<Value> {
        std::fs::read_to_string(self.dir.join("spool/accepted").join(name))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
    }

    pub fn status(&self, run_id: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join("runs").join(run_id).join("status.json")).unwrap())
            .unwrap()
    }

    pub fn events(&self, run_id: &str) -> Vec<Value> {
        let text =
            std::fs::read_to_string(self.dir.join("runs").join(run_id).join("metrics.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run_id_of(root: &Root, name: &str) -> String {
    let r = wait_for(&format!("receipt of {name}"), Duration::from_secs(60), || root.receipt(name));
    r["run_id"].as_str().unwrap().to_string()
}

pub fn wait_state(root: &Root, run_id: &str, states: &[&str], timeout: Duration) -> Value {
    wait_for(&format!("{run_id} to reach {states:?}"), timeout, || {
        let s = root.status(run_id);
        states.contains(&s["state"].as_str().unwrap()).then_some(s)
    })
}

pub fn wait_steps(root: &Root, run_id: &str, n: usize) {
    wait_for(&format!("{n} steps of {run_id}"), Duration::from_secs(90), || {
        (root.events(run_id).iter().filter(|e| e["type"] == "step").count() >= n).then_some(())
    });
}

pub fn signal(child: &Child, sig: i32) {
    rerankd::sys::signal(child.id(), sig).unwrap();
}

pub fn stop(mut d: Child) {
    signal(&d, libc::SIGTERM);
    let _ = d.wait();
}

impl Root {
    pub fn drop_job_text(&self, name: &str, text: &str) {
        let tmp = self.dir.join("spool/tmp").join(name);
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.dir.join("spool").join(name)).unwrap();
    }
}

pub fn ts_of(e: &Value) -> String {
    e["ts"].as_str().unwrap().to_string()
}

pub fn parse_ts(s: &str) -> std::time::SystemTime {
    // 2026-11-25T23:19:25.123456Z -> via `date`-free arithmetic on the time of day only is not
    // enough across midnight, so compare against the same clock: seconds since the epoch.
    let (date, time) = s.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap();
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    std::time::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_micros(frac.parse().unwrap())
}

impl Root {
    pub fn log_path(&self) -> PathBuf {
        self.dir.parent().unwrap().join("daemon.log")
    }
}

impl Drop for Root {
    /// On a failing test: the daemon's log tail and every run's status, so a timeout explains
    /// itself.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("---- daemon.log (last 60 lines) ----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        if let Ok(rd) = std::fs::read_dir(self.dir.join("runs")) {
            for e in rd.filter_map(|e| e.ok()) {
                let st = std::fs::read_to_string(e.path().join("status.json")).unwrap_or_default();
                eprintln!("---- {} ----\n{st}", e.file_name().to_string_lossy());
            }
        }
    }
}

/// Sends a signal to any pid (a test's own children, or a run process read from status.json).
pub fn kill_pid(pid: u32, sig: i32) {
    let _ = rerankd::sys::signal(pid, sig);
}

/// The pid a run's status.json records.
pub fn pid_of(root: &Root, run: &str) -> u32 {
    root.status(run)["pid"].as_u64().unwrap() as u32
}

/// SIGKILL to a process that is not our child (it was the dead daemon's), then wait until it is
/// gone.
pub fn kill_until_gone(pid: u32) {
    kill_pid(pid, libc::SIGKILL);
    wait_for("the process to be gone", Duration::from_secs(5), || (!rerankd::sys::pid_alive(pid)).then_some(()));
}

/// Waits until `dir` holds exactly `n` entries.
pub fn wait_entries(dir: &std::path::Path, n: usize) {
    wait_for(&format!("{n} entries in {}", dir.display()), Duration::from_secs(20), || {
        (std::fs::read_dir(dir).map_or(0, |rd| rd.count()) == n).then_some(())
    });
}

/// Every run's status.json, by run id.
pub fn statuses(root: &Root) -> Vec<Value> {
    let Ok(rd) = std::fs::read_dir(root.dir.join("runs")) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read_to_string(e.path().join("status.json")).ok())
        .filter_map(|s| serde_json::from_str(&s).ok())
        .collect()
}

/// Waits for a daemon child to exit (bounded); returns its exit code.
pub fn wait_exit(d: &mut Child, timeout: Duration) -> Option<i32> {
    let st = wait_for("the daemon to exit", timeout, || d.try_wait().unwrap());
    st.code()
}

/// The invariants every fault must leave (issue: reliability). `settled`: no daemon is running
/// now, so no run may be `running` at all. Returns a description of the first violation.
pub fn check_invariants(root: &Root, settled: bool) -> Result<(), String> {
    let mut spans: std::collections::HashMap<String, Vec<(String, String, String)>> = Default::default();
    for st in statuses(root) {
        let id = st["run_id"].as_str().unwrap().to_string();
        let state = st["state"].as_str().unwrap();
        let ev = root.events(&id);
        for (i, e) in ev.iter().enumerate() {
            if e["seq"].as_u64() != Some(i as u64) {
                return Err(format!("{id}: seq gap at line {i}"));
            }
        }
        let states: Vec<&str> =
            ev.iter().filter(|e| e["type"] == "state").filter_map(|e| e["state"].as_str()).collect();
        let terminal = states.iter().filter(|s| matches!(**s, "completed" | "failed" | "cancelled")).count();
        if terminal > 1 {
            return Err(format!("{id}: {terminal} terminal events {states:?}"));
        }
        if matches!(state, "completed" | "failed" | "cancelled") && states.last() != Some(&state) {
            return Err(format!("{id}: status {state} but last state event {:?}", states.last()));
        }
        if state == "running" {
            let pid = st["pid"].as_u64().unwrap_or(0) as u32;
            if settled || !rerankd::sys::pid_alive(pid) {
                return Err(format!("{id}: running without a live process (pid {pid})"));
            }
        }
        // Each attempt is a span: from a `running` event to the next state event (a resumed
        // run has several).
        let state_ev: Vec<&Value> = ev.iter().filter(|e| e["type"] == "state").collect();
        for (i, e) in state_ev.iter().enumerate() {
            if e["state"] == "running" {
                let end = state_ev.get(i + 1).map(|n| ts_of(n)).unwrap_or_else(|| "9999".into());
                let corpus = st["corpus"].as_str().unwrap().to_string();
                spans.entry(corpus).or_default().push((ts_of(e), end, id.clone()));
            }
        }
    }
    for (c, mut v) in spans {
        v.sort();
        for w in v.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!("corpus {c}: runs overlap: {w:?}"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.dir.join("models")) {
        for c in rd.filter_map(|e| e.ok()) {
            let link = c.path().join("current");
            if link.symlink_metadata().is_err() {
                continue;
            }
            let target = std::fs::canonicalize(&link).map_err(|e| format!("{}: {e}", link.display()))?;
            if !target.join("adapter_model.safetensors").is_file() || !target.join("manifest.json").is_file() {
                return Err(format!("{} is not a complete adapter", target.display()));
            }
            let run = target.file_name().unwrap().to_string_lossy().into_owned();
            if settled {
                let st = root.status(&run);
                if st["state"] != "completed" {
                    return Err(format!("current serves {run}, which is {}", st["state"]));
                }
            }
        }
    }
    Ok(())
}

/// Every file dropped has exactly one answer: a receipt (`accepted/`) or a rejection.
pub fn answers(root: &Root, name: &str) -> usize {
    let stem = name.strip_suffix(".json").unwrap();
    let count = |dir: &str, f: &dyn Fn(&str) -> bool| {
        std::fs::read_dir(root.dir.join("spool").join(dir))
            .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| f(&e.file_name().to_string_lossy())).count())
            .unwrap_or(0)
    };
    let is = |n: &str| {
        n == name
            || (n.starts_with(&format!("{stem}."))
                && n.ends_with(".json")
                && !n.ends_with(".error.json")
                && n[stem.len() + 1..n.len() - 5].parse::<u32>().is_ok())
    };
    count("accepted", &is) + count("rejected", &is)
}

/// A test's daemon: SIGTERMed when dropped, and killed outright if the test failed first.
pub struct DaemonGuard(pub Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        kill_pid(self.0.id(), libc::SIGTERM);
        if std::thread::panicking() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A running `rerankd serve`, its log beside the root (printed if the test fails), killed on drop.
pub struct Serve {
    pub child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Serve {
    pub fn start(root: &Root, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut c = root.cli_cmd(["serve"]);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        Self::spawn(root, c)
    }

    /// Starts `c` (a serve command line, maybe wrapped) and waits for its serve.json.
    pub fn spawn(root: &Root, mut c: Command) -> Serve {
        let log = root.dir.parent().unwrap().join("serve.log");
        let _ = std::fs::remove_file(root.dir.join("serve.json"));
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c.stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap());
        let mut child = c.spawn().unwrap();
        let info: Value = wait_for("serve.json", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("serve exited {st}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            let v: Value = serde_json::from_str(&std::fs::read_to_string(root.dir.join("serve.json")).ok()?).ok()?;
            v["pid"].as_u64().is_some_and(|p| p == child.id() as u64).then_some(v)
        });
        let url = info["listen"].as_str().unwrap_or_default().to_string();
        Serve { child: Some(child), url, log }
    }

    /// On the fixture model, CPU, an ephemeral loopback port, plus `args`.
    pub fn fixture(root: &Root, args: &[&str]) -> Serve {
        let model = fixture_model();
        let mut all = vec!["--listen", "127.0.0.1:0", "--device", "cpu", "--model", model.as_str()];
        all.extend_from_slice(args);
        Self::start(root, &all, &[])
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM and the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut c = self.child.take().unwrap();
        kill_pid(c.id(), libc::SIGTERM);
        wait_exit(&mut c, Duration::from_secs(30))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- serve.log ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build(),
    )
}

/// `rerankd score ... --json`: per input document, (score, yes - no).
pub fn score_cli(root: &Root, extra: &[&str], query: &str, docs: &[String]) -> Vec<(f64, f64)> {
    score_cli_env(root, extra, query, docs, &[])
}

/// [`score_cli`] with `env` set for the process.
pub fn score_cli_env(
    root: &Root,
    extra: &[&str],
    query: &str,
    docs: &[String],
    env: &[(&str, &str)],
) -> Vec<(f64, f64)> {
    let mut c = root.cli_cmd(["score", "--device", "cpu", "--json", "--query", query]);
    c.args(extra).envs(env.iter().copied());
    for d in docs {
        c.arg("--doc").arg(d);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "score: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["score"].as_f64().unwrap(), v["yes_logit"].as_f64().unwrap() - v["no_logit"].as_f64().unwrap())
        })
        .collect()
}
