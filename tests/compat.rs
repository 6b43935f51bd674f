//! The files an older rerankd wrote are still read by today's code. `tests/data/v1/root` was made
//! by `tests/data/v1/make.sh` with the binary of the commit before the renovation: a completed and
//! promoted demo run with its receipts, models and held-out lists, the demo corpus's feedback,
//! documents and policy, a `config.toml`, a run paused with its checkpoint, and a run that a daemon
//! shutting down had to kill (left queued, with that daemon's `cancel` note "daemon shutdown").
//! `status`, `watch`, `report`, `sweep`, serve with the policy's capture, and resume all read them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the old root into a fresh temporary one, links as links, with `@REPO@` (the paths of
/// the repository where it was made) put back as this checkout's path.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let kind = e.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from).unwrap(), &to).unwrap();
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            let bytes = std::fs::read(&from).unwrap();
            let bytes = match String::from_utf8(bytes) {
                Ok(text) => text.replace("@REPO@", &repo().display().to_string()).into_bytes(),
                Err(e) => e.into_bytes(),
            };
            std::fs::write(&to, bytes).unwrap();
        }
    }
}

fn old_root() -> Root {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("root");
    copy_tree(&repo().join("tests/data/v1/root"), &dir);
    Root { _tmp: tmp, dir }
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// The three runs of the old root: (completed, paused, interrupted by a shutdown).
fn runs(root: &Root) -> (String, String, String) {
    let out = root.cli_cmd(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = json_lines(&out.stdout);
    assert_eq!(all.len(), 3, "{all:?}");
    let find = |corpus: &str, state: &str| {
        let s = all.iter().find(|s| s["corpus"] == corpus && s["state"] == state);
        s.unwrap_or_else(|| panic!("no {state} run of {corpus} in {all:?}"))["run_id"].as_str().unwrap().to_string()
    };
    (find("demo", "completed"), find("demo", "paused"), find("b", "queued"))
}

#[test]
fn an_old_root_reads_serves_and_resumes() {
    let root = old_root();
    let (done, paused, interrupted) = runs(&root);
    let why = root.status(&interrupted)["reason"].as_str().unwrap().to_string();
    assert!(why.contains("daemon shutdown") && why.contains("resumes from its checkpoint"), "{why}");

    // watch: the completed run's events, typed, to its end.
    let out = root.cli_cmd(["watch", &done, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let events = json_lines(&out.stdout);
    assert!(events.iter().any(|e| e["type"] == "step") && events.iter().any(|e| e["type"] == "eval"));
    assert!(events.iter().any(|e| e["type"] == "state" && e["state"] == "completed"));

    // report: drawn again from the old files.
    let out = root.cli_cmd(["report", &done]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.dir.join("runs").join(&done).join("report.svg").is_file());

    // sweep: nothing to settle, and nothing changed.
    let before: Vec<Value> = [&done, &paused, &interrupted].iter().map(|id| root.status(id)).collect();
    let out = root.cli_cmd(["sweep", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after: Vec<Value> = [&done, &paused, &interrupted].iter().map(|id| root.status(id)).collect();
    assert_eq!(before, after);

    // serve: the promoted adapter, the old config's [serve] table, capture on by the old policy.
    let feedback = root.dir.join("corpora/demo/feedback.jsonl");
    let lines_before = std::fs::read_to_string(&feedback).unwrap().lines().count();
    let s = Serve::fixture(&root, &[]);
    let a = agent();
    let body = json!({"model": "demo", "query": "how do I reset a password", "documents": ["a", "b"]});
    let mut r =
        a.post(format!("{}/v1/rerank", s.url)).header("Content-Type", "application/json").send_json(&body).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let reply: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(reply["meta"]["adapter"], done.as_str(), "{reply}");
    assert_eq!(std::fs::read_to_string(&feedback).unwrap().lines().count(), lines_before + 1, "captured");
    let many: Vec<String> = (0..501).map(|i| format!("d{i}")).collect();
    let body = json!({"model": "demo", "query": "q", "documents": many});
    let r = a.post(format!("{}/v1/rerank", s.url)).header("Content-Type", "application/json").send_json(&body).unwrap();
    assert_eq!(r.status().as_u16(), 413, "the old config's max_documents = 500 holds");
    assert_eq!(s.stop(), Some(0));

    // resume: the paused run from its checkpoint, and the run the old daemon's shutdown
    // interrupted (its `cancel` note is no cancel); both complete.
    let out = root.cli_cmd(["resume", &paused]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut d = root.cli_cmd(["daemon", "--until-idle"]);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(root.log_path()).unwrap();
    let mut d = d.stderr(log).spawn().unwrap();
    let code = wait_for("the daemon to finish", Duration::from_secs(300), || d.try_wait().unwrap());
    assert!(code.success(), "{code:?}");
    for id in [&paused, &interrupted] {
        let st = root.status(id);
        assert_eq!(st["state"], "completed", "{st}");
        let resumed = root
            .events(id)
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.starts_with("training resumed at step")));
        assert!(resumed, "{id} resumed from its checkpoint");
    }
    // Every line of every log, the old code's and today's, reads as a typed event of a type
    // this build knows: no field was renamed under either.
    for id in [&done, &paused, &interrupted] {
        let text = std::fs::read_to_string(root.dir.join("runs").join(id).join("metrics.jsonl")).unwrap();
        for line in text.lines() {
            let e: rerankd::store::Logged =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("{id}: {err}: {line}"));
            assert_ne!(e.event, rerankd::store::Event::Other, "{id}: {line}");
        }
    }
}
