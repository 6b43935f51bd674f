//! Checkpoints and resume with the real daemon, real signals and the fixture model: a run paused
//! and resumed, interrupted by daemon shutdowns, killed with SIGKILL (daemon and run) or torn
//! mid-checkpoint ends with exactly the adapter, metrics and decision of the same job run
//! without interruption; a run interrupted twice without progress fails; an unexplained death
//! shrinks the memory plan.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);

/// The job of every test here: 4 epochs of the fixture triplets, a checkpoint after every step.
fn job(root: &Root, micro: u64, accum: u64) -> Value {
    let mut j = root.job("c1", 4);
    j["train"]["batch_size"] = micro.into();
    j["train"]["grad_accum"] = accum.into();
    j["train"]["checkpoint_every_s"] = 0.into();
    j["memory_budget_mb"] = 4096.into();
    j
}

/// What must come out equal: the adapter's bytes, the candidate's metrics, the decision.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// sha256 of the adapter's safetensors file.
    adapter: String,
    candidate: Value,
    decision: Value,
    steps: Value,
}

fn outcome(root: &Root, id: &str) -> Outcome {
    let dir = root.dir.join("runs").join(id);
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let st = root.status(id);
    assert_eq!(st["state"], "completed", "{st}");
    // The run records `completed` first and removes its checkpoint right after (a crash in
    // between must not lose the completed run): wait for the removal.
    wait_for("a completed run to remove its checkpoint", Duration::from_secs(10), || {
        (!dir.join("checkpoint").exists()).then_some(())
    });
    Outcome {
        adapter: {
            use sha2::Digest;
            let bytes = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
            sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
        },
        candidate: eval["candidate"].clone(),
        decision: eval["promotion"].clone(),
        steps: st["summary"]["steps"].clone(),
    }
}

/// The same job, uninterrupted, in a root of its own.
fn reference(micro: u64, accum: u64) -> Outcome {
    let root = Root::new("");
    let _d = DaemonGuard(root.daemon());
    let id = root.submit("ref.json", &job(&root, micro, accum));
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    outcome(&root, &id)
}

fn steps(root: &Root, id: &str) -> usize {
    root.events(id).iter().filter(|e| e["type"] == "step").count()
}

fn state_events(root: &Root, id: &str) -> Vec<Value> {
    root.events(id).into_iter().filter(|e| e["type"] == "state").collect()
}

/// The log is one gap-free sequence across attempts.
fn assert_gap_free(root: &Root, id: &str) {
    let seqs: Vec<u64> = root.events(id).iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn pause_resume_and_two_shutdowns_in_a_row_end_bitwise_equal() {
    let want = reference(4, 1);
    let root = Root::new("");
    let sleepy = [("RERANKD_TEST_STEP_SLEEP_MS", "40")];
    let mut d = root.daemon_env(&sleepy);
    let id = root.submit("j.json", &job(&root, 4, 1));
    wait_steps(&root, &id, 4);
    // Pause: checkpoints, stops, keeps its corpus.
    let out = root.cli_cmd(["pause", &id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = root.status(&id);
    assert_eq!(st["state"], "paused", "{st}");
    assert!(st["reason"].as_str().unwrap().starts_with("paused at step "), "{st}");
    let other = root.submit("other.json", &root.job("c1", 1));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(root.status(&other)["state"], "queued", "the paused run keeps its corpus");
    let out = root.cli_cmd(["cancel", &other]).output().unwrap();
    assert!(out.status.success());
    let out = root.cli_cmd(["resume", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_state(&root, &id, &["running"], LONG);
    // Two daemon shutdowns in a row, each after some progress: the run checkpoints and waits
    // in the queue for the next daemon.
    for _ in 0..2 {
        let before = steps(&root, &id);
        wait_steps(&root, &id, before + 3);
        signal(&d, libc::SIGTERM);
        assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), Some(0));
        let st = root.status(&id);
        assert_eq!(st["state"], "queued", "{st}");
        let why = st["reason"].as_str().unwrap();
        assert!(why.contains("interrupted (daemon shutdown) at step") && why.contains("resumes"), "{st}");
        d = root.daemon_env(&sleepy);
        wait_state(&root, &id, &["running", "completed"], LONG);
    }
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    stop(d);
    assert_eq!(outcome(&root, &id), want, "interrupted run vs the same job uninterrupted");
    assert_gap_free(&root, &id);
    let attempts: Vec<u64> = state_events(&root, &id).iter().filter_map(|e| e["attempt"].as_u64()).collect();
    assert_eq!(attempts.iter().max(), Some(&4), "{attempts:?}");
    let ev = root.events(&id);
    assert_eq!(ev.iter().filter(|e| e["type"] == "eval" && e["which"] == "baseline").count(), 1, "baseline once");
    assert_eq!(
        ev.iter().filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with("training resumed at step"))).count(),
        3
    );
    let ck = ev.iter().find(|e| e["type"] == "checkpoint").unwrap();
    assert!(ck["size_bytes"].as_u64().unwrap() > 0 && ck["step"].is_u64(), "{ck}");
}

#[test]
fn sigkill_of_daemon_and_run_resumes_from_the_checkpoint() {
    // No evidence of memory pressure: the plan stays, so the result must be bitwise that of the
    // uninterrupted run.
    let want = reference(1, 4);
    let root = Root::new("");
    let sleepy = [("RERANKD_TEST_STEP_SLEEP_MS", "30")];
    let d = root.daemon_env(&sleepy);
    let id = root.submit("j.json", &job(&root, 1, 4));
    wait_steps(&root, &id, 5);
    let run_pid = pid_of(&root, &id);
    kill_pid(d.id(), libc::SIGKILL);
    kill_pid(run_pid, libc::SIGKILL);
    let mut d = d;
    let _ = d.wait();
    kill_until_gone(run_pid);
    assert_eq!(root.status(&id)["state"], "running", "nobody recorded the deaths");
    let d = DaemonGuard(root.daemon_env(&sleepy));
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    assert_eq!(outcome(&root, &id), want);
    assert_gap_free(&root, &id);
    // Nothing said the deaths were memory: the plan stays.
    let requeued = state_events(&root, &id).into_iter().find(|e| e["state"] == "queued" && e["attempt"] == 1).unwrap();
    assert!(!requeued["reason"].as_str().unwrap().contains("smaller memory plan"), "{requeued}");
    assert!(!root.events(&id).iter().any(|e| e["type"] == "cap"), "a cap event without memory evidence");
}

/// Deaths without evidence of memory pressure (kill -9 of the run, twice, micro-batch 4) keep the
/// plan: the result is bitwise that of the uninterrupted run, and no `cap` event is written.
#[test]
fn deaths_without_memory_evidence_keep_the_plan_bitwise() {
    let want = reference(4, 1);
    let root = Root::new("");
    let d = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_STEP_SLEEP_MS", "30")]));
    let id = root.submit("j.json", &job(&root, 4, 1));
    for n in [3, 6] {
        wait_steps(&root, &id, n);
        kill_pid(pid_of(&root, &id), libc::SIGKILL);
        wait_for("the next attempt", LONG, || {
            (root.status(&id)["state"] != "running" || steps(&root, &id) > n).then_some(())
        });
    }
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    assert_eq!(outcome(&root, &id), want);
    assert!(!root.events(&id).iter().any(|e| e["type"] == "cap"), "a cap event without memory evidence");
}

/// A death with evidence of memory pressure (its last sampled memory at or over its budget: a
/// 300 MB ballast under a 256 MB budget) shrinks the next attempt's micro-batch, keeps the
/// steps, and names the evidence in the `cap` event.
#[test]
fn a_death_under_memory_pressure_shrinks_the_micro_batch_and_keeps_the_steps() {
    let ref_root = Root::new("");
    let want_id = {
        let _d = DaemonGuard(ref_root.daemon());
        let id = ref_root.submit("ref.json", &job(&ref_root, 4, 1));
        wait_state(&ref_root, &id, &["completed", "failed", "cancelled"], LONG);
        id
    };
    let want = outcome(&ref_root, &want_id);
    let want_path = ref_root.dir.join("runs").join(&want_id).join("adapter/adapter_model.safetensors");
    let root = Root::new("");
    let d = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_STEP_SLEEP_MS", "200"), ("RERANKD_TEST_ALLOC_MB", "300")]));
    let mut j = job(&root, 4, 1);
    j["memory_budget_mb"] = 256.into();
    let id = root.submit("j.json", &j);
    wait_steps(&root, &id, 5);
    std::thread::sleep(std::time::Duration::from_secs(1)); // a supervision tick samples it
    assert_eq!(root.status(&id)["state"], "running");
    kill_pid(pid_of(&root, &id), libc::SIGKILL);
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    let got = outcome(&root, &id);
    let cap = root
        .events(&id)
        .into_iter()
        .find(|e| e["type"] == "cap" && e["why"].as_str().is_some_and(|w| w.contains("memory pressure")));
    let cap = cap.expect("a cap event for the smaller plan");
    let (from, to) = (cap["from"].as_u64().unwrap(), cap["to"].as_u64().unwrap());
    assert!(
        cap["field"] == "train.batch_size" && from <= 4 && to == rerankd::budget::shrunk_micro_batch(from),
        "{cap}"
    );
    assert!(cap["why"].as_str().unwrap().contains("at or over its budget of 256 MB"), "{cap}");
    // The same optimizer steps on the same pairs; only the micro-batch split (the order in
    // which gradients are summed) differs, so the numbers agree to rounding, not bitwise.
    assert_eq!(got.steps, want.steps);
    let load = |p: std::path::PathBuf| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(root.dir.join("runs").join(&id).join("adapter/adapter_model.safetensors")), load(want_path));
    let mut max = 0f32;
    for (k, t) in &a {
        let d = (t - &b[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max = max.max(d);
    }
    eprintln!("max |adapter difference| after a resume under a 3/4 micro-batch: {max:e}");
    // (0 when the best epoch was finished before the death.)
    assert!(max < 1e-2, "{max}");
    let plan = format!("resuming under the checkpoint's plan: micro-batch {to},");
    assert!(root.events(&id).iter().any(|e| e["message"].as_str().is_some_and(|m| m.starts_with(&plan))), "{plan}");
    // status: both attempts' starts, the first kept as started_at, and the reduced plan.
    let st = root.status(&id);
    let starts = st["attempts"].as_array().expect("the attempts' starts");
    assert_eq!(starts.len(), 2, "{st}");
    assert_eq!(st["started_at"], starts[0], "{st}");
    let out = root.cli_cmd(["status", &id]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("attempt 2, started at"), "{text}");
    // The reduced plan held until the attempt crossed an epoch boundary, then the planned one
    // again (status shows no reduced plan at the end).
    assert_back_to_the_plan(&root, &id, to);
}

#[test]
fn a_torn_checkpoint_is_never_used() {
    let want = reference(1, 4);
    let root = Root::new("");
    // Every run process dies (SIGKILL) in its 4th checkpoint, after the files and before the
    // link swap: each attempt resumes from the 3rd, the last complete one.
    let d = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_CRASH_AT", "checkpoint.before_swap#4")]));
    let id = root.submit("j.json", &job(&root, 1, 4));
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    assert_eq!(outcome(&root, &id), want);
    // Each attempt logged three checkpoints and died in the fourth; the next resumed at the
    // third's step, never at the torn one's.
    let ev = root.events(&id);
    let mut last_ck: Option<u64> = None;
    let mut resumes = 0;
    for e in &ev {
        if e["type"] == "checkpoint" {
            last_ck = e["step"].as_u64();
        }
        if let Some(m) = e["message"].as_str()
            && let Some(rest) = m.strip_prefix("training resumed at step ")
        {
            let at: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(Some(at), last_ck, "resumed from the last complete checkpoint");
            resumes += 1;
        }
    }
    assert!(resumes >= 2, "{resumes}");
}

/// The crash loop guard counts optimizer steps, not checkpoints: two deaths, each after steps of
/// its own attempt (at other steps than the attempt before) but with no checkpoint since step 0
/// (one an hour), both resume; a third death (daemon and run) too; then two attempts in a row
/// that die before any step (killed right after recording `running`) park the run `paused` with
/// its checkpoint, and `rerankd resume` completes it.
#[test]
fn the_crash_loop_guard_counts_steps_and_parks_a_loop_with_its_checkpoint() {
    let root = Root::new("");
    let sleepy = [("RERANKD_TEST_STEP_SLEEP_MS", "50")];
    let mut d = root.daemon_env(&sleepy);
    let mut j = job(&root, 4, 1);
    j["train"]["checkpoint_every_s"] = 3600.into(); // only the first checkpoint, at step 0
    let id = root.submit("j.json", &j);
    let running = |attempt: u64| {
        wait_for(&format!("attempt {attempt} running"), LONG, || {
            let st = root.status(&id);
            (st["attempt"] == attempt && st["state"] == "running").then_some(())
        })
    };
    // Each attempt resumes from step 0 and dies at another step than the one before it.
    for (attempt, n) in [(1, 2), (2, 4)] {
        running(attempt);
        let before = steps(&root, &id);
        wait_steps(&root, &id, before + n);
        kill_pid(pid_of(&root, &id), libc::SIGKILL);
    }
    running(3);
    let before = steps(&root, &id);
    wait_steps(&root, &id, before + 1);
    let run_pid = pid_of(&root, &id);
    kill_pid(d.id(), libc::SIGKILL);
    kill_pid(run_pid, libc::SIGKILL);
    let _ = d.wait();
    kill_until_gone(run_pid);
    // Every attempt from now on dies right after recording `running`.
    d = root.daemon_env(&[("RERANKD_TEST_CRASH_AT", "run.after_running")]);
    let st = wait_state(&root, &id, &["paused", "completed", "failed", "cancelled"], LONG);
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["attempt"], 5, "{st}");
    let why = st["reason"].as_str().unwrap();
    assert!(why.contains("interrupted twice without progress") && why.contains("rerankd resume"), "{st}");
    assert!(root.dir.join("runs").join(&id).join("checkpoint").exists(), "the parked run lost its checkpoint");
    let queued: Vec<String> = state_events(&root, &id)
        .iter()
        .filter(|e| e["state"] == "queued" && e["attempt"].is_u64())
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(queued.len(), 4, "attempts 1-4 resumed: {queued:?}");
    assert!(queued.iter().all(|r| r.contains("resumes from its checkpoint")), "{queued:?}");
    signal(&d, libc::SIGTERM);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), Some(0));
    let d = DaemonGuard(root.daemon());
    let out = root.cli_cmd(["resume", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    assert_eq!(st["state"], "completed", "{st}");
}

#[test]
fn a_queued_run_pauses_before_it_starts_and_resume_starts_it() {
    let root = Root::new("");
    let d = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_STEP_SLEEP_MS", "30")]));
    let first = root.submit("first.json", &job(&root, 4, 1));
    let second = root.submit("second.json", &root.job("c1", 1));
    wait_steps(&root, &first, 1);
    let out = root.cli_cmd(["pause", &second, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = wait_state(&root, &second, &["paused"], LONG);
    assert!(st["started_at"].is_null(), "paused before it started: {st}");
    wait_state(&root, &first, &["completed"], LONG);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(root.status(&second)["state"], "paused", "a paused run stays paused");
    let out = root.cli_cmd(["resume", &second]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_state(&root, &second, &["completed"], LONG);
    drop(d);
    assert_gap_free(&root, &second);
}

/// A daemon that has to kill a run at its shutdown timeout leaves it queued to resume, and the
/// next daemon resumes it: the shutdown's request does not outlive the attempt it stopped. Then
/// `pause` followed at once by stopping the daemon: the run ends paused (at once, or by the next
/// daemon), never cancelled, and `resume` completes it.
#[test]
fn a_run_killed_at_the_shutdown_timeout_and_a_pause_then_stop_resume_and_complete() {
    let root = Root::new("shutdown_timeout_s = 1\n");
    // Each micro-step sleeps 2.5 s, so the run cannot reach a boundary within the timeout.
    let sleepy = [("RERANKD_TEST_STEP_SLEEP_MS", "2500")];
    let run = |d: &mut std::process::Child| {
        signal(d, libc::SIGTERM);
        let code = wait_for("daemon exit", Duration::from_secs(30), || d.try_wait().unwrap());
        assert!(code.success(), "{code:?}");
    };
    let mut d = root.daemon_env(&sleepy);
    let id = root.submit("a.json", &job(&root, 4, 1));
    let checkpoints = || root.events(&id).iter().filter(|e| e["type"] == "checkpoint").count();
    wait_for("the first checkpoint", LONG, || (checkpoints() >= 1).then_some(()));
    run(&mut d);
    let st = root.status(&id);
    assert_eq!(st["state"], "queued", "{st}");
    let why = st["reason"].as_str().unwrap();
    assert!(why.contains("daemon shutdown") && why.contains("resumes from its checkpoint"), "{st}");
    let files = root.dir.join("runs").join(&id);
    assert!(!files.join("cancel").exists() && !files.join("shutdown").exists(), "no request outlives the attempt");

    // The next daemon resumes it; a pause asked for and the daemon stopped at once.
    let mut d = root.daemon_env(&sleepy);
    wait_for("attempt 2 running", LONG, || {
        let st = root.status(&id);
        (st["attempt"] == 2 && st["state"] == "running").then_some(())
    });
    let out = root.cli_cmd(["pause", &id, "--wait", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run(&mut d);
    // The next daemon, until it is idle: it pauses the run if the pause was not taken before the
    // kill (a queued run with a pause request), and leaves a paused one as it is.
    let until_idle = || {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(root.log_path()).unwrap();
        let mut d = root.cli_cmd(["daemon", "--until-idle"]).stderr(log).spawn().unwrap();
        let code = wait_for("the daemon to be idle", LONG, || d.try_wait().unwrap());
        assert!(code.success(), "{code:?}");
    };
    until_idle();
    let st = root.status(&id);
    assert_eq!(st["state"], "paused", "{st}");
    let out = root.cli_cmd(["resume", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until_idle();
    let st = root.status(&id);
    assert_eq!(st["state"], "completed", "{st}");
    assert_gap_free(&root, &id);
}

/// The highest optimizer step the run has logged.
fn last_step(root: &Root, id: &str) -> u64 {
    root.events(id).iter().filter(|e| e["type"] == "step").filter_map(|e| e["step"].as_u64()).max().unwrap_or(0)
}

/// Ten kill -9s at random steps and random moments within them (inside checkpoint writes too) —
/// of the run, of the daemon (the next one adopts the run), or of both — with a micro-batch of 4:
/// no kill is evidence of memory pressure, so the plan stays and the run ends with the adapter
/// bytes, metrics and decision of the uninterrupted run. The seed is printed to replay a failure
/// (`RERANKD_TEST_SEED`).
#[test]
fn ten_random_kills_of_the_daemon_the_run_or_both_end_bitwise() {
    use rand::{Rng, SeedableRng};
    let want = reference(4, 1);
    let total = want.steps.as_u64().unwrap();
    assert!(total >= 12, "the job has {total} steps: too few for ten kills");
    let seed = std::env::var("RERANKD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} ({total} steps)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut targets: Vec<u64> =
        rand::seq::index::sample(&mut rng, (total - 1) as usize, 10).into_iter().map(|i| i as u64 + 1).collect();
    targets.sort_unstable();
    let env = [("RERANKD_TEST_STEP_SLEEP_MS", "30")];
    let root = Root::new("");
    let mut d = DaemonGuard(root.daemon_env(&env));
    let id = root.submit("j.json", &job(&root, 4, 1));
    let (mut kinds, mut seen) = (Vec::new(), 0);
    for target in targets {
        // A step past what the killed attempt had logged: the attempt now running made progress
        // (two attempts in a row without any would rightly be parked by the crash loop guard).
        let target = target.max(seen + 1);
        wait_for(&format!("step {target}"), LONG, || (last_step(&root, &id) >= target).then_some(()));
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        let kind = ["run", "daemon", "both"][rng.random_range(0..3)];
        if kind != "daemon" {
            kill_pid(pid_of(&root, &id), libc::SIGKILL);
        }
        if kind != "run" {
            let _ = d.0.kill();
            let _ = d.0.wait();
            d = DaemonGuard(root.daemon_env(&env));
        }
        seen = last_step(&root, &id);
        kinds.push(format!("{kind}@{seen}"));
    }
    eprintln!("kills: {}", kinds.join(" "));
    wait_state(&root, &id, &["completed", "failed", "cancelled", "paused"], LONG);
    drop(d);
    assert_eq!(outcome(&root, &id), want, "seed {seed}, kills {kinds:?}");
    assert!(!root.events(&id).iter().any(|e| e["type"] == "cap"), "a cap event without memory evidence");
    assert_gap_free(&root, &id);
}

/// A run of `micro` x `accum` under a 256 MB budget that allocates 1.5 GB at optimizer step 3
/// (the daemon's watchdog kills it), to its end: the root, the run and its final status.
fn run_killed_by_the_watchdog_at_step_3(micro: u64, accum: u64) -> (Root, String, Value) {
    let root = Root::new("");
    let d = DaemonGuard(root.daemon_env(&[("RERANKD_TEST_STEP_SLEEP_MS", "100"), ("RERANKD_TEST_ALLOC_MB", "1500@3")]));
    let mut j = job(&root, micro, accum);
    j["memory_budget_mb"] = 256.into();
    let id = root.submit("j.json", &j);
    let st = wait_state(&root, &id, &["completed", "failed", "cancelled", "paused"], LONG);
    drop(d);
    (root, id, st)
}

/// The daemon's own memory watchdog is evidence of memory pressure: a run that grows past its hard
/// limit after making progress (1.5 GB at step 3 under a 256 MB budget, whose hard limit is
/// 768 MB) is killed, resumes from its checkpoint under a 3/4 micro-batch, and completes; the
/// `cap` event and `status` name the kill.
#[test]
fn a_watchdog_kill_after_progress_resumes_under_a_smaller_plan() {
    let (root, id, st) = run_killed_by_the_watchdog_at_step_3(4, 1);
    assert_eq!(st["state"], "completed", "{st}");
    let cap = root
        .events(&id)
        .into_iter()
        .find(|e| e["type"] == "cap" && e["field"] == "train.batch_size")
        .expect("a cap event for the smaller plan");
    assert!(cap["why"].as_str().unwrap().contains("killed by the daemon: memory"), "{cap}");
    assert_eq!((cap["from"].as_u64(), cap["to"].as_u64()), (Some(4), Some(3)), "{cap}");
    let st = root.status(&id);
    assert_eq!(st["attempts"].as_array().map(Vec::len), Some(2), "{st}");
    assert_back_to_the_plan(&root, &id, 3);

    // At a micro-batch of one row the plan cannot shrink: the run fails saying so, rather than
    // meeting the same end again.
    let (_root, _, st) = run_killed_by_the_watchdog_at_step_3(1, 4);
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["error"].as_str().unwrap().contains("cannot shrink"), "{st}");
}

/// The run trained under micro-batch `reduced` after its shrink, then returned to the planned 4
/// at the next epoch boundary: the log says so, the checkpoints after it record 4, and `status`
/// shows no reduced plan at the end.
fn assert_back_to_the_plan(root: &Root, id: &str, reduced: u64) {
    let ev = root.events(id);
    let back = ev
        .iter()
        .find(|e| e["message"].as_str().is_some_and(|m| m.starts_with("back to the planned micro-batch of 4")));
    let back = back.unwrap_or_else(|| panic!("no return to the plan in {ev:?}"));
    assert!(back["message"].as_str().unwrap().contains(&format!("reduced one ({reduced})")), "{back}");
    let st = root.status(id);
    assert!(st["plan"].is_null(), "{st}");
}
