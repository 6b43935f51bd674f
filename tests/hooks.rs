//! on_finish hooks: once per run, with the run in the environment, and a hook that hangs is
//! killed after its timeout without delaying the next run.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

#[test]
fn on_finish_runs_once_per_run_and_a_hanging_hook_is_killed_without_delaying_the_next_run() {
    let out = tempfile::tempdir().unwrap();
    let hook =
        format!("env | grep ^RERANKD_ | sort > {}/$RERANKD_RUN_ID.env; echo hello from the hook", out.path().display());
    let root = Root::new(&format!("on_finish = {:?}\non_finish_timeout_s = 2\n", hook));
    let _d = DaemonGuard(root.daemon());

    let a = root.submit("a.json", &root.job("c1", 1));
    wait_state(&root, &a, &["completed"], Duration::from_secs(60));
    let env = wait_for("the hook's output", Duration::from_secs(10), || {
        std::fs::read_to_string(out.path().join(format!("{a}.env"))).ok().filter(|t| t.contains("RERANKD_STATE"))
    });
    for want in [
        format!("RERANKD_RUN_ID={a}"),
        "RERANKD_STATE=completed".into(),
        "RERANKD_CORPUS=c1".into(),
        format!("RERANKD_RUN_DIR={}", root.dir.join("runs").join(&a).display()),
        "RERANKD_PRIMARY_METRIC=ndcg@10".into(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing from\n{env}");
    }
    let logged = wait_for("the hook's log event", Duration::from_secs(10), || {
        root.events(&a).into_iter().find(|e| e.get("hook").is_some())
    });
    assert!(logged["message"].as_str().unwrap().contains("exited 0"), "{logged}");
    assert!(logged["hook"]["output_tail"].as_str().unwrap().contains("hello from the hook"));

    // The job's own hook hangs: the next run starts at once, and the hook is killed at 2 s.
    let mut job = root.job("c1", 1);
    job["on_finish"] = "sleep 1000".into();
    let b = root.submit("b.json", &job);
    let st_b = wait_state(&root, &b, &["completed"], Duration::from_secs(60));
    let c = root.submit("c.json", &root.job("c1", 1));
    let st_c = wait_state(&root, &c, &["running", "completed"], Duration::from_secs(60));
    let (ended, started) =
        (parse_ts(st_b["finished_at"].as_str().unwrap()), parse_ts(st_c["started_at"].as_str().unwrap()));
    let gap = started.duration_since(ended).unwrap_or_default();
    eprintln!("next run started {gap:?} after the one whose hook hangs");
    assert!(gap < Duration::from_millis(1900), "the hanging hook delayed the next run by {gap:?}");
    let killed = wait_for("the hanging hook killed", Duration::from_secs(10), || {
        root.events(&b).into_iter().find(|e| e.get("hook").is_some())
    });
    assert!(killed["message"].as_str().unwrap().contains("killed after its timeout"), "{killed}");
    assert_eq!(killed["level"], "warn");
    assert!(!out.path().join(format!("{b}.env")).exists(), "the job's hook replaces the config's");
    wait_state(&root, &c, &["completed"], Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    for run in [&a, &b] {
        let n = root.events(run).iter().filter(|e: &&Value| e.get("hook").is_some()).count();
        assert_eq!(n, 1, "{run}: the hook ran {n} times");
    }
    // No `sleep 1000` left behind.
    let ps = std::process::Command::new("sh").arg("-c").arg("ps -eo args | grep -c '^sleep 1000$'").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "0", "the hook's process group was not killed");
}
