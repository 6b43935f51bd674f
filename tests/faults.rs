//! The fault suite (issue: reliability): an idle daemon sleeps, runs yield the machine, and
//! every fault a user, a crash or a full disk can cause leaves the documented invariants. All on
//! the fixture model, with the real binary, real signals, a real tmpfs and real FIFOs.

use crate::common::*;

use std::process::Command;
use std::time::{Duration, Instant};

const STEP_SLEEP: &str = "RERANKD_TEST_STEP_SLEEP_MS";
const CRASH_AT: &str = "RERANKD_TEST_CRASH_AT";

fn mkfifo(p: &std::path::Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

/// The daemon has finished its boot (its layout exists and it answered one job).
fn wait_ready(root: &Root) {
    wait_answered(root, "ready");
}

/// Drops an unparsable `<stem>.json` and waits for its rejection: the daemon has swept and
/// scanned since.
fn wait_answered(root: &Root, stem: &str) {
    root.drop_job_text(&format!("{stem}.json"), "[]"); // valid JSON, not a job: answered at once
    wait_for("the daemon to answer", Duration::from_secs(30), || {
        root.dir.join(format!("spool/rejected/{stem}.error.json")).exists().then_some(())
    });
}

#[cfg(target_os = "linux")]
#[test]
fn an_idle_daemon_sleeps_and_a_supervising_one_nearly_does() {
    let root = Root::new("");
    let mut d = root.daemon_env(&[(STEP_SLEEP, "300")]);
    wait_ready(&root);
    // A job goes through first, so the spool and the watcher have seen activity.
    let id = root.submit("a.json", &root.job("c", 1));
    wait_state(&root, &id, &["completed"], Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let hz = rerankd::sys::ticks_per_second() as f64;
    let t0 = rerankd::sys::cpu_ticks(d.id()).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let idle = (rerankd::sys::cpu_ticks(d.id()).unwrap() - t0) as f64 / hz / 10.0;
    // While it supervises a run (which sleeps 300 ms per step, so the run is not what we time).
    let id = root.submit("b.json", &root.job("c", 20));
    wait_steps(&root, &id, 1);
    let t0 = rerankd::sys::cpu_ticks(d.id()).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let busy = (rerankd::sys::cpu_ticks(d.id()).unwrap() - t0) as f64 / hz / 5.0;
    println!(
        "daemon CPU: idle {:.3}% of a core over 10 s; supervising a run {:.3}% over 5 s",
        idle * 100.0,
        busy * 100.0
    );
    assert!(idle < 0.01, "an idle daemon used {:.1}% of a core", idle * 100.0);
    assert!(busy < 0.05, "a supervising daemon used {:.1}% of a core", busy * 100.0);
    signal(&d, libc::SIGTERM);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), Some(0));
}

#[cfg(target_os = "linux")]
#[test]
fn runs_lower_their_cpu_and_io_priority() {
    let root = Root::new("run_nice = 7\n");
    let d = root.daemon_env(&[(STEP_SLEEP, "200")]);
    let id = root.submit("a.json", &root.job("c", 20));
    wait_steps(&root, &id, 1);
    let (nice, io) = rerankd::sys::priority(pid_of(&root, &id)).unwrap();
    assert_eq!(nice, 7);
    assert_eq!(io, Some((2 << 13) | 7), "best-effort class, lowest level");
    stop(d);
}

#[test]
fn config_toml_every_documented_key_works_and_a_bad_one_names_itself() {
    let root = Root::new(
        "max_concurrent_runs = 2\ncancel_grace_s = 5\nrescan_s = 10\nshutdown_timeout_s = 5\n\
         memory_budget_mb = 4096\nrun_nice = 10\n",
    );
    let out = root.cli_cmd(["daemon", "--until-idle"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (text, key) in [("cancel_grace_s = 1e20", "cancel_grace_s"), ("shutdown_timeout_s = inf", "shutdown_timeout_s")]
    {
        std::fs::write(root.dir.join("config.toml"), text).unwrap();
        let out = root.cli_cmd(["daemon", "--until-idle"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && !err.contains("panicked"), "{err}");
    }
    // A bad config at SIGHUP keeps the old one: the daemon lives on and still takes jobs.
    std::fs::write(root.dir.join("config.toml"), "").unwrap();
    let mut d = root.daemon();
    wait_ready(&root);
    std::fs::write(root.dir.join("config.toml"), "cancel_grace_s = inf\nbogus = 1\n").unwrap();
    signal(&d, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.try_wait().unwrap().is_none(), "the daemon died on a bad reload");
    root.submit("after.json", &root.job("c", 1));
    signal(&d, libc::SIGTERM);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), Some(0));
    let log = std::fs::read_to_string(root.log_path()).unwrap();
    assert!(log.contains("config not reloaded"), "{log}");
}

#[test]
fn submit_refuses_a_bad_wait_before_submitting_and_takes_dotfiles() {
    let root = Root::new("");
    let job = root.dir.parent().unwrap().join(".hidden.json");
    std::fs::write(&job, root.job("c", 1).to_string()).unwrap();
    for bad in ["nan", "inf", "-1", "1e30"] {
        let out = root.cli_cmd(["submit"]).arg(&job).arg("--wait").arg(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "--wait {bad}");
    }
    let spooled = std::fs::read_dir(root.dir.join("spool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .count();
    assert_eq!(spooled, 0, "nothing submitted by a refused command");
    let d = root.daemon();
    let out = root.cli_cmd(["submit"]).arg(&job).arg("--wait").arg("30").output().unwrap();
    assert!(out.status.success());
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(receipt["run_id"].is_string(), "{receipt}");
    stop(d);
}

#[test]
fn fifos_and_devices_never_freeze_the_daemon() {
    let root = Root::new("cancel_grace_s = 60\n");
    let home = root.dir.join("corpora/c");
    std::fs::create_dir_all(&home).unwrap();
    mkfifo(&home.join("fifo.jsonl"));
    let mut d = root.daemon_env(&[(STEP_SLEEP, "200")]);
    let mut job = root.job("c", 1);
    job["data"]["triplets"] = "fifo.jsonl".into();
    root.drop_job("fifo.json", &job);
    let err = wait_for("the FIFO job's rejection", Duration::from_secs(20), || {
        std::fs::read_to_string(root.dir.join("spool/rejected/fifo.error.json")).ok()
    });
    assert!(err.contains("data.triplets") && err.contains("not a regular file"), "{err}");
    // A FIFO as the cancel sentinel: read without blocking, and it means "cancel".
    let id = root.submit("a.json", &root.job("c", 50));
    wait_steps(&root, &id, 1);
    mkfifo(&root.dir.join("runs").join(&id).join("cancel"));
    wait_state(&root, &id, &["cancelled"], Duration::from_secs(20));
    // A link to /dev/zero: never read to the end of the world.
    let id = root.submit("b.json", &root.job("c", 50));
    wait_steps(&root, &id, 1);
    std::os::unix::fs::symlink("/dev/zero", root.dir.join("runs").join(&id).join("cancel")).unwrap();
    let st = wait_state(&root, &id, &["cancelled"], Duration::from_secs(20));
    assert_eq!(st["reason"], "cancelled by user");
    let rss = rerankd::sys::process_memory_mb(d.id()).unwrap();
    assert!(rss < 200, "daemon at {rss} MB");
    let t0 = Instant::now();
    signal(&d, libc::SIGTERM);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(10)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_run_adopted_after_a_daemon_crash_is_supervised_to_its_end() {
    let root = Root::new("");
    let mut d1 = root.daemon_env(&[(STEP_SLEEP, "200")]);
    let long = root.submit("long.json", &root.job("c", 50));
    let next = root.submit("next.json", &root.job("c", 1));
    wait_steps(&root, &long, 1);
    kill_pid(d1.id(), libc::SIGKILL);
    let _ = d1.wait();
    let d2 = root.daemon();
    wait_for("the new daemon to adopt the run", Duration::from_secs(20), || {
        std::fs::read_to_string(root.log_path()).ok().filter(|l| l.contains("adopting")).map(|_| ())
    });
    kill_pid(pid_of(&root, &long), libc::SIGKILL);
    // Its end is recorded by the daemon that adopted it: back to the queue, to resume.
    let requeued = wait_for("the adopted run to be queued again", Duration::from_secs(20), || {
        root.events(&long).into_iter().find(|e| e["type"] == "state" && e["state"] == "queued" && e["attempt"] == 1)
    });
    let why = requeued["reason"].as_str().unwrap();
    assert!(why.contains("adopted") && why.contains("resumes from its checkpoint"), "{requeued}");
    assert!(root.cli_cmd(["cancel", &long]).output().unwrap().status.success());
    wait_state(&root, &long, &["cancelled"], Duration::from_secs(30));
    wait_state(&root, &next, &["completed"], Duration::from_secs(60));
    check_invariants(&root, false).unwrap();
    let out = root.cli_cmd(["watch", &long]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    stop(d2);
}

#[test]
fn names_that_cannot_be_kept_are_rejected_never_left_waiting() {
    use std::os::unix::ffi::OsStrExt;
    let root = Root::new("");
    let d = root.daemon();
    wait_ready(&root);
    let long = format!("{}.json", "L".repeat(225));
    root.drop_job(&long, &root.job("c", 1));
    let raw = std::ffi::OsStr::from_bytes(b"\xffbad.json");
    let tmp = root.dir.join("spool/tmp/raw");
    std::fs::write(&tmp, root.job("c", 1).to_string()).unwrap();
    std::fs::rename(&tmp, root.dir.join("spool").join(raw)).unwrap();
    wait_entries(&root.dir.join("spool/rejected"), 6); // both, and the readiness probe
    let reasons: String = std::fs::read_dir(root.dir.join("spool/rejected"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".error.json"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(reasons.contains("not UTF-8") && reasons.contains("bytes long"), "{reasons}");
    assert_eq!(
        std::fs::read_dir(root.dir.join("spool")).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).count(),
        0
    );
    stop(d);
}

#[test]
fn rejections_never_overwrite_a_file_or_a_reason() {
    let root = Root::new("");
    let d = root.daemon();
    wait_ready(&root);
    let rej = root.dir.join("spool/rejected");
    let answered = |n: usize| wait_entries(&rej, n);
    root.drop_job_text("x.error.json", "{\"corpus\": \"x.error.json was MY job file");
    answered(4);
    root.drop_job_text("x.json", "{\"corpus\": \"bad\"");
    answered(6);
    assert!(std::fs::read_to_string(rej.join("x.error.json")).unwrap().contains("MY job file"));
    root.drop_job_text("a.json.json", "{\"first\": ");
    answered(8);
    root.drop_job_text("a.json", "{\"second\": ");
    answered(10);
    let all: Vec<String> =
        std::fs::read_dir(&rej).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(all.len(), 10, "{all:?}");
    for (job, reason) in [
        ("x.error.json", "x.error.error.json"),
        ("x.2.json", "x.2.error.json"),
        ("a.json.json", "a.json.error.json"),
        ("a.json", "a.error.json"),
    ] {
        assert!(rej.join(job).is_file() && rej.join(reason).is_file(), "{job} / {reason}: {all:?}");
    }
    assert!(std::fs::read_to_string(rej.join("a.json.json")).unwrap().contains("first"));
    stop(d);
}

#[test]
fn cli_names_are_never_paths() {
    let root = Root::new("");
    let outside = root.dir.parent().unwrap();
    for args in
        [["rollback", "../../x"], ["cancel", "../runs/x"], ["promote", "../../y"], ["stop", "a/b"], ["watch", ".."]]
    {
        let out = root.cli_cmd(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!outside.join("x.lock").exists() && !root.dir.join("x.lock").exists());
    let out = Command::new(BIN).args(["--root", "/dev/null", "runs"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a root that is a file is an error, not an empty list");
}

#[test]
fn the_permission_check_covers_the_whole_layout() {
    use std::os::unix::fs::PermissionsExt;
    let root = Root::new("");
    std::fs::create_dir_all(root.dir.join("corpora/c")).unwrap();
    std::fs::set_permissions(root.dir.join("corpora/c"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = root.cli_cmd(["daemon", "--until-idle"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corpora/c") && err.contains("chmod go-w"), "{err}");
    let out = root.cli_cmd(["doctor"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("corpora/c"));
}

/// A job that always promotes (so promotion crash points are reached).
fn promoting(root: &Root, corpus: &str) -> serde_json::Value {
    let mut j = root.job(corpus, 1);
    j["promote"] = "always".into();
    j
}

/// Runs `rerankd daemon --until-idle` to the end (no fault hooks): settles what a crash left.
fn drain(root: &Root) {
    let mut d = root.cli_cmd(["daemon", "--until-idle"]);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(root.log_path()).unwrap();
    let st = d.stderr(log).status().unwrap();
    assert!(st.success(), "the draining daemon failed");
}

#[test]
fn crash_points_in_intake_leave_one_answer_per_file() {
    for point in [
        "intake.after_claim",
        "intake.before_publish_run",
        "intake.after_create_run",
        "intake.after_receipt",
        "intake.after_reason",
    ] {
        let root = Root::new("");
        let mut d = root.daemon_env(&[(CRASH_AT, point)]);
        if point == "intake.after_reason" {
            root.drop_job_text("j.json", "{\"corpus\": 1}");
        } else {
            root.drop_job("j.json", &root.job("c", 1));
        }
        assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), None, "{point}: the daemon was not killed");
        drain(&root);
        assert_eq!(answers(&root, "j.json"), 1, "{point}: answers");
        let runs = std::fs::read_dir(root.dir.join("runs")).unwrap().count();
        assert_eq!(runs, usize::from(point != "intake.after_reason"), "{point}: runs (temps included)");
        check_invariants(&root, true).unwrap_or_else(|e| panic!("{point}: {e}"));
    }
}

#[test]
fn crash_points_in_a_run_and_its_promotion_leave_current_on_a_completed_run() {
    for point in [
        "run.after_running",
        "promote.before_log",
        "promote.after_log",
        "promote.after_swap",
        "run.after_promote_event",
        "record.completed.after_event",
    ] {
        let root = Root::new("");
        // A first run, promoted, so there is something to go back to.
        let d = root.daemon();
        let a = root.submit("a.json", &promoting(&root, "c"));
        wait_state(&root, &a, &["completed"], Duration::from_secs(60));
        stop(d);
        let d = root.daemon_env(&[(CRASH_AT, point)]);
        let b = root.submit("b.json", &promoting(&root, "c"));
        let st = wait_state(&root, &b, &["completed", "failed", "cancelled", "paused"], Duration::from_secs(90));
        stop(d);
        // Killed before its first checkpoint -> failed; killed at the same point after training in
        // every attempt -> a crash loop, parked `paused` with its checkpoint after three attempts;
        // neither is current. The logged completion -> completed.
        let expect = match point {
            "record.completed.after_event" => "completed",
            "run.after_running" => "failed",
            _ => "paused",
        };
        let st = if expect == "paused" { wait_state(&root, &b, &["paused"], Duration::from_secs(60)) } else { st };
        assert_eq!(st["state"], expect, "{point}: {st}");
        if expect == "paused" {
            assert!(st["reason"].as_str().unwrap().contains("interrupted twice without progress"), "{point}: {st}");
        }
        let current = std::fs::read_link(root.dir.join("models/c/current")).unwrap();
        let serving = if expect == "completed" { &b } else { &a };
        assert!(current.ends_with(serving), "{point}: current -> {current:?}");
        check_invariants(&root, true).unwrap_or_else(|e| panic!("{point}: {e}"));
        if expect != "paused" {
            let out = root.cli_cmd(["watch", &b]).output().unwrap();
            assert_eq!(out.status.code(), Some(if expect == "completed" { 0 } else { 1 }), "{point}: watch");
        }
        // The promotion log agrees with `current`: rollback goes back exactly as far as it should.
        let out = root.cli_cmd(["rollback", "c"]).output().unwrap();
        assert_eq!(out.status.code(), Some(if expect == "completed" { 0 } else { 4 }), "{point}: rollback");
    }
}

#[test]
fn a_crash_while_recording_a_failure_leaves_one_terminal_event() {
    // The run records `failed` (its data is bad) and dies between the event and status.json;
    // the daemon completes that state instead of adding another.
    let root = Root::new("");
    let d = root.daemon_env(&[(CRASH_AT, "record.failed.after_event")]);
    let mut job = root.job("c", 1);
    job["model"] = root.dir.parent().unwrap().join("no-such-model").display().to_string().into();
    let id = root.submit("a.json", &job);
    let st = wait_state(&root, &id, &["failed", "cancelled"], Duration::from_secs(30));
    assert_eq!(st["state"], "failed");
    assert!(st["error"].as_str().unwrap().contains("no-such-model"), "{st}");
    stop(d);
    check_invariants(&root, true).unwrap();
}

/// Random kill -9 of the daemon, the run process or both, at random instants, with jobs on two
/// corpora in flight; the invariants are checked after every restart. `RERANKD_FAULT_SEED` and
/// `RERANKD_FAULT_ROUNDS` (default 40) choose the loop.
#[test]
fn random_kill_9_rounds_keep_every_invariant() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("RERANKD_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let rounds: usize = std::env::var("RERANKD_FAULT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = Root::new("");
    let mut dropped = Vec::new();
    for round in 0..rounds {
        let mut d = root.daemon_env(&[(STEP_SLEEP, "30")]);
        wait_answered(&root, &format!("boot{round:03}"));
        check_invariants(&root, false).unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        for _ in 0..rng.random_range(0..3) {
            let corpus = if rng.random_bool(0.5) { "c0" } else { "c1" };
            let name = format!("r{round:03}_{}.json", dropped.len());
            let job = if rng.random_bool(0.5) { promoting(&root, corpus) } else { root.job(corpus, 2) };
            root.drop_job(&name, &job);
            dropped.push(name);
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..1500)));
        let victims = rng.random_range(0..3); // 0: daemon, 1: run, 2: both
        if victims != 0 {
            for st in statuses(&root).iter().filter(|s| s["state"] == "running") {
                kill_pid(st["pid"].as_u64().unwrap() as u32, libc::SIGKILL);
            }
        }
        if victims != 1 {
            kill_pid(d.id(), libc::SIGKILL);
        } else {
            std::thread::sleep(Duration::from_millis(300));
            kill_pid(d.id(), libc::SIGKILL);
        }
        let _ = d.wait();
    }
    drain(&root);
    check_invariants(&root, true).unwrap_or_else(|e| panic!("seed {seed} after the drain: {e}"));
    for name in &dropped {
        assert_eq!(answers(&root, name), 1, "seed {seed}: {name}");
    }
    println!("{rounds} rounds, seed {seed}, {} jobs dropped, {} runs", dropped.len(), statuses(&root).len());
}

/// A tmpfs mounted for one test and unmounted when dropped (skipped where mounting is refused).
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        ok.is_ok_and(|s| s.success()).then(|| Self { dir: at.to_path_buf() })
    }

    /// Fills the file system to the last byte; returns the filler's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.dir.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A full disk (a real 4 MB tmpfs holding the state root, filled to the last byte) while a run
/// checkpoints every step: the run keeps its checkpoints and waits in the queue (recorded by the
/// run, or by the daemon once it can write), no attempt starts while the space it needs is not
/// there, and once space is freed it resumes from its last checkpoint (not from scratch) and
/// completes; a job dropped meanwhile is not lost and runs after it.
#[test]
fn a_full_disk_loses_no_job_and_the_run_resumes_when_space_is_back() {
    let root = Root::new("");
    let Some(disk) = SmallDisk::mount(&root.dir.parent().unwrap().join("small"), "4m") else {
        rerankd::testhooks::skipped(
            "faults::a_full_disk_loses_no_job",
            "tmpfs",
            "mounting a tmpfs was refused (needs root or CAP_SYS_ADMIN)",
        );
        return;
    };
    // The state root lives on the small disk; the model and the data do not.
    let small = Root { _tmp: tempfile::tempdir().unwrap(), dir: disk.dir.join("root") };
    std::fs::create_dir_all(small.dir.join("spool/tmp")).unwrap();
    let mut job = root.job("c", 8);
    job["data"]["triplets"] = root.triplets().into();
    job["train"]["checkpoint_every_s"] = 0.into();
    let mut d = small.daemon_env(&[(STEP_SLEEP, "100")]);
    let id = small.submit("a.json", &job);
    wait_steps(&small, &id, 3);
    std::fs::write(small.dir.join("spool/tmp/b.json"), root.job("c", 1).to_string()).unwrap();
    let filler = disk.fill();
    std::fs::rename(small.dir.join("spool/tmp/b.json"), small.dir.join("spool/b.json")).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(d.try_wait().unwrap().is_none(), "the daemon died on a full disk");
    let b_there = small.dir.join("spool/b.json").exists()
        || std::fs::read_dir(small.dir.join("spool/.claimed")).unwrap().count() == 1
        || small.receipt("b.json").is_some();
    assert!(b_there, "the dropped job was lost");
    let st = small.status(&id);
    assert_ne!(st["state"], "failed", "{st}");
    let attempt = st["attempt"].clone();
    assert!(small.dir.join("runs").join(&id).join("checkpoint").exists(), "the checkpoint was deleted");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(small.status(&id)["attempt"], attempt, "an attempt started with no space");
    std::fs::remove_file(filler).unwrap();
    let st = wait_state(&small, &id, &["completed", "failed", "cancelled"], Duration::from_secs(120));
    assert_eq!(st["state"], "completed", "{st}");
    let ev = small.events(&id);
    let queued = ev.iter().find(|e| e["type"] == "state" && e["state"] == "queued" && e["attempt"].is_u64());
    let why = queued.and_then(|e| e["reason"].as_str()).unwrap_or_default();
    assert!(why.contains("disk is full") && why.contains("MB are free"), "{queued:?}");
    let resumed = ev.iter().filter_map(|e| e["message"].as_str()?.strip_prefix("training resumed at step ")).next();
    let at: u64 = resumed.expect("resumed from a checkpoint").split_whitespace().next().unwrap().parse().unwrap();
    assert!(at >= 1, "resumed at step {at}: the progress before the full disk was lost");
    // The job dropped while the disk was full runs once space is back.
    let b = run_id_of(&small, "b.json");
    wait_state(&small, &b, &["completed"], Duration::from_secs(60));
    assert_eq!(answers(&small, "b.json"), 1);
    signal(&d, libc::SIGTERM);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(30)), Some(0));
    check_invariants(&small, true).unwrap();
}

#[test]
fn a_thousand_job_files_at_once_are_all_answered_in_flat_memory() {
    let root = Root::new("");
    let d = root.daemon();
    wait_ready(&root);
    let mut job = root.job("c", 1);
    job["if_busy"] = "reject".into();
    job["promote"] = "never".into();
    let names: Vec<String> = (0..1000).map(|i| format!("k{i:04}.json")).collect();
    for (i, n) in names.iter().enumerate() {
        let text = if i % 2 == 0 { job.to_string() } else { format!("{{\"corpus\": {i}}}") };
        std::fs::write(root.dir.join("spool/tmp").join(n), text).unwrap();
    }
    for n in &names {
        std::fs::rename(root.dir.join("spool/tmp").join(n), root.dir.join("spool").join(n)).unwrap();
    }
    let answered = |k: usize| {
        wait_for(&format!("{k} answers"), Duration::from_secs(300), || {
            (names.iter().take(k).all(|n| answers(&root, n) == 1)).then_some(())
        })
    };
    answered(100);
    let early = rerankd::sys::process_memory_mb(d.id()).unwrap();
    answered(1000);
    let late = rerankd::sys::process_memory_mb(d.id()).unwrap();
    println!("daemon memory after 100 answers {early} MB, after 1000 {late} MB");
    assert!(late <= early + 30, "daemon memory grew from {early} to {late} MB");
    let out = root.cli_cmd(["stop", "c"]).output().unwrap();
    assert!(out.status.success());
    stop(d);
}

#[test]
fn torn_and_half_written_files_of_every_kind_recover() {
    let root = Root::new("");
    let mut d = root.daemon();
    let a = root.submit("a.json", &promoting(&root, "c"));
    wait_state(&root, &a, &["completed"], Duration::from_secs(60));
    signal(&d, libc::SIGTERM);
    wait_exit(&mut d, Duration::from_secs(30));
    // A dead writer's pid for the temp names.
    let mut t = Command::new("true").spawn().unwrap();
    let dead = t.id();
    t.wait().unwrap();
    let run = root.dir.join("runs").join(&a);
    let models = root.dir.join("models/c");
    std::fs::write(run.join(format!(".status.json.tmp.{dead}")), "{\"run_id\": \"x").unwrap();
    std::fs::write(root.dir.join(format!("spool/accepted/.a.json.tmp.{dead}")), "{").unwrap();
    std::fs::write(root.dir.join(format!("spool/rejected/.z.error.json.tmp.{dead}")), "").unwrap();
    std::os::unix::fs::symlink("adapters/nowhere", models.join(format!(".current.tmp.{dead}"))).unwrap();
    let half = models.join(format!("adapters/.B.tmp.{dead}"));
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("adapter_model.safetensors"), [0u8; 10]).unwrap();
    std::fs::create_dir_all(root.dir.join(format!("runs/.c__20260101_000000.tmp.{dead}"))).unwrap();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(run.join("metrics.jsonl")).unwrap();
    f.write_all(b"{\"ts\": \"2026-").unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(models.join("promotions.jsonl")).unwrap();
    f.write_all(b"{\"run_id\": \"B\", \"prev").unwrap();
    drain(&root);
    for p in [
        run.join(format!(".status.json.tmp.{dead}")),
        root.dir.join(format!("spool/accepted/.a.json.tmp.{dead}")),
        root.dir.join(format!("spool/rejected/.z.error.json.tmp.{dead}")),
        models.join(format!(".current.tmp.{dead}")),
        half,
        root.dir.join(format!("runs/.c__20260101_000000.tmp.{dead}")),
    ] {
        assert!(p.symlink_metadata().is_err(), "{} was not cleaned", p.display());
    }
    check_invariants(&root, true).unwrap();
    assert!(std::fs::read_link(models.join("current")).unwrap().ends_with(&a));
    let out = root.cli_cmd(["watch", &a]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "watch over a torn tail");
    let out = root.cli_cmd(["rollback", "c"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "one promotion: nothing to roll back to");
    // status.json itself is only ever replaced whole: a reader sees a complete one.
    assert_eq!(root.status(&a)["state"], "completed");
}

#[test]
fn dev_fraction_zero_and_a_non_utf8_feedback_line_are_reported_as_such() {
    let root = Root::new("");
    let home = root.dir.join("corpora/demo");
    std::fs::create_dir_all(&home).unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
    std::fs::copy(demo.join("documents.jsonl"), home.join("documents.jsonl")).unwrap();
    let mut fb = std::fs::read(demo.join("feedback.jsonl")).unwrap();
    fb.extend_from_slice(b"\xff\xfe not utf-8\n");
    std::fs::write(home.join("feedback.jsonl"), fb).unwrap();
    let mut job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("job.json")).unwrap()).unwrap();
    job["model"] = fixture_model().into();
    job["train"]["epochs"] = 1.into();
    job["eval"]["dev_fraction"] = 0.0.into();
    let d = root.daemon();
    let id = root.submit("a.json", &job);
    let st = wait_state(&root, &id, &["completed", "failed"], Duration::from_secs(60));
    assert_eq!(st["state"], "completed", "{st}");
    let ev = root.events(&id);
    let promote = ev.iter().find(|e| e["type"] == "promote").unwrap();
    assert!(promote["reason"].as_str().unwrap().contains("dev_fraction is 0"), "{promote}");
    let skipped = ev.iter().find(|e| e["message"] == "skipped feedback events").unwrap();
    assert_eq!(skipped["skipped"]["not UTF-8"], 1, "{skipped}");
    stop(d);
}

#[test]
fn score_prints_one_line_per_input_document_duplicates_included() {
    let root = Root::new("");
    let docs = root.dir.parent().unwrap().join("docs.jsonl");
    std::fs::write(&docs, "{\"id\": \"a\", \"text\": \"one\"}\n{\"id\": \"dup\", \"text\": \"two\"}\n{\"id\": \"dup\", \"text\": \"three\"}\n").unwrap();
    let out = root
        .cli_cmd(["score", "--model", &fixture_model(), "--device", "cpu", "--query", "q", "--json"])
        .arg("--docs")
        .arg(&docs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["id"], "dup");
    assert_ne!(lines[1]["score"], lines[2]["score"], "the second `dup` is scored with its own text");
}

#[test]
fn an_in_place_writer_that_pauses_three_seconds_gets_its_job_accepted() {
    use std::io::Write;
    let root = Root::new("");
    let d = root.daemon();
    wait_ready(&root);
    let text = root.job("c", 1).to_string();
    let mut f = std::fs::File::create(root.dir.join("spool/slow.json")).unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    f.write_all(b.as_bytes()).unwrap();
    drop(f);
    let id = run_id_of(&root, "slow.json");
    assert!(!root.dir.join("spool/rejected/slow.json").exists(), "rejected as cut short");
    wait_state(&root, &id, &["completed"], Duration::from_secs(60));
    stop(d);
}

#[test]
fn a_deleted_layout_is_recreated_and_a_file_named_spool_is_refused_clearly() {
    let root = Root::new("");
    let d = root.daemon();
    wait_ready(&root);
    std::fs::remove_dir_all(root.dir.join("spool/accepted")).unwrap();
    std::fs::remove_dir_all(root.dir.join("spool/.claimed")).unwrap();
    let id = root.submit("after.json", &root.job("c", 1)); // its receipt is written all the same (F5)
    wait_state(&root, &id, &["completed"], Duration::from_secs(60));
    stop(d);
    let other = Root::new("");
    std::fs::remove_dir_all(other.dir.join("spool")).unwrap();
    std::fs::write(other.dir.join("spool"), "").unwrap();
    let out = other.cli_cmd(["daemon", "--until-idle"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("spool is not a directory") && !err.contains("(os error 17): File exists"), "{err}");
}
