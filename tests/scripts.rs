//! The spool as a directory: the example job files and the two example scripts, run as a user
//! would from a fresh root.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn has(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_example_jobs_and_scripts_work_from_a_fresh_root() {
    let root = Root::new("");
    let home = root.dir.join("corpora/demo");
    std::fs::create_dir_all(&home).unwrap();
    for f in ["documents.jsonl", "feedback.jsonl"] {
        std::fs::copy(repo().join("examples/demo").join(f), home.join(f)).unwrap();
    }
    std::fs::copy(root.dir.parent().unwrap().join("triplets.jsonl"), home.join("triplets.jsonl")).unwrap();
    let _d = DaemonGuard(root.daemon());
    if !has("inotifywait") {
        rerankd::testhooks::skipped(
            "scripts: submit_and_wait.sh's inotify branch",
            "inotifywait",
            "inotifywait is not installed: submit_and_wait.sh polls",
        );
    }
    let submit = |job: &str| {
        Command::new(repo().join("examples/submit_and_wait.sh"))
            .arg(&root.dir)
            .arg(repo().join("spool").join(job))
            .current_dir(repo())
            .env("RERANKD_WAIT_S", "120")
            .output()
            .unwrap()
    };
    for job in ["triplets.json", "feedback.json", "memory-budget.json"] {
        let out = submit(job);
        assert_eq!(out.status.code(), Some(0), "{job}: {}", String::from_utf8_lossy(&out.stderr));
        let run = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(run.starts_with("demo__"), "{job}: {run}");
        assert_eq!(root.status(&run)["state"], "completed");
        if job == "triplets.json" {
            if has("jq") {
                let out =
                    Command::new(repo().join("examples/tail_metrics.sh")).arg(&root.dir).arg(&run).output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8(out.stdout).unwrap();
                assert!(text.contains("step 1 ") && text.lines().last() == Some("state completed"), "{text}");
            } else {
                rerankd::testhooks::skipped("scripts: tail_metrics.sh", "jq", "jq is not installed");
            }
        }
    }
    // if_busy: reject while a run of the corpus is active; supersede cancels it.
    let mut long: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("spool/triplets.json")).unwrap()).unwrap();
    long["train"]["epochs"] = 1000.into();
    let active = root.submit("long.json", &long);
    wait_state(&root, &active, &["running"], Duration::from_secs(60));
    let out = submit("if-busy-reject.json");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"));
    let out = submit("if-busy-supersede.json");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let st = wait_state(&root, &active, &["cancelled"], Duration::from_secs(60));
    assert!(st["reason"].as_str().unwrap().contains("superseded"), "{st}");
}
