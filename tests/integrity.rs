//! Damaged state never wins: checkpoints and adapters prove themselves (sha256 seals), with the
//! real daemon, real SIGKILLs and real byte flips on disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);

/// Flips one bit in the middle of a file, in place (what a bad sector or a stray write does).
fn flip(path: &Path) {
    let mut b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let i = b.len() / 2;
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

fn latest_checkpoint(root: &Root, id: &str) -> PathBuf {
    let run = root.dir.join("runs").join(id);
    run.join(std::fs::read_link(run.join("checkpoint")).unwrap())
}

fn steps(root: &Root, id: &str) -> usize {
    root.events(id).iter().filter(|e| e["type"] == "step").count()
}

/// The job: 4 epochs of the fixture triplets, one row per micro-batch (an unexplained death
/// cannot shrink it, so the result stays bitwise), a checkpoint after every step.
fn job(root: &Root) -> Value {
    let mut j = root.job("c1", 4);
    j["train"]["batch_size"] = 1.into();
    j["train"]["grad_accum"] = 4.into();
    j["train"]["checkpoint_every_s"] = 0.into();
    j["memory_budget_mb"] = 4096.into();
    j["promote"] = "never".into();
    j
}

/// (adapter sha256, candidate metrics, steps) of a completed run.
fn outcome(root: &Root, id: &str) -> (String, Value, Value) {
    let dir = root.dir.join("runs").join(id);
    let st = root.status(id);
    assert_eq!(st["state"], "completed", "{st}");
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    (sha256(&dir.join("adapter/adapter_model.safetensors")), eval["candidate"].clone(), st["summary"]["steps"].clone())
}

/// A flipped byte in each file of a checkpoint (the LoRA tensors, the optimizer's moments, the
/// state, the best epoch's adapter), each flipped while daemon and run were dead: every next
/// attempt names the damaged file, skips that checkpoint for the one before it, and the run ends
/// with the adapter bytes and metrics of the same job uninterrupted.
#[test]
fn a_flipped_byte_in_any_checkpoint_file_is_named_and_skipped() {
    let want = {
        let root = Root::new("");
        let _d = DaemonGuard(root.daemon());
        let id = root.submit("ref.json", &job(&root));
        wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
        outcome(&root, &id)
    };
    let root = Root::new("");
    let sleepy = [("RERANKD_TEST_STEP_SLEEP_MS", "30")];
    let mut d = root.daemon_env(&sleepy);
    let id = root.submit("j.json", &job(&root));
    let files =
        ["lora/adapter_model.safetensors", "optimizer.safetensors", "state.json", "best/adapter_model.safetensors"];
    for (i, file) in files.into_iter().enumerate() {
        // Two checkpoints of this attempt at least, and the file to damage in the latest; each
        // attempt dies at another step than the one before it (one that resumed from the same
        // checkpoint and died at the same step would be a crash loop, parked by the guard).
        let before = steps(&root, &id);
        wait_steps(&root, &id, before + 2 + i);
        wait_for(&format!("a checkpoint with {file}"), LONG, || {
            latest_checkpoint(&root, &id).join(file).is_file().then_some(())
        });
        let run_pid = pid_of(&root, &id);
        kill_pid(d.id(), libc::SIGKILL);
        kill_pid(run_pid, libc::SIGKILL);
        let _ = d.wait();
        kill_until_gone(run_pid);
        assert_eq!(root.status(&id)["state"], "running", "the run ended before {file} could be damaged");
        let damaged = latest_checkpoint(&root, &id);
        flip(&damaged.join(file));
        d = root.daemon_env(&sleepy);
        let name = damaged.file_name().unwrap().to_string_lossy().into_owned();
        wait_for(&format!("the damage to {file} named"), LONG, || {
            root.events(&id)
                .iter()
                .any(|e| {
                    e["level"] == "warn"
                        && e["message"].as_str().is_some_and(|m| {
                            m.contains("is damaged and skipped") && m.contains(&name) && m.contains(file)
                        })
                })
                .then_some(())
        });
    }
    wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    stop(d);
    assert_eq!(outcome(&root, &id), want, "damaged checkpoints skipped vs the same job uninterrupted");
}

/// An adapter proves itself before it is promoted or scored: a flipped byte in a run's adapter
/// makes `promote` refuse, naming the file, and nothing changes; once the byte is back it is
/// promoted; a flipped byte in the promoted copy makes `score` fail, naming the file.
#[test]
fn a_damaged_adapter_is_never_promoted_or_scored() {
    let root = Root::new("");
    let d = DaemonGuard(root.daemon());
    let mut j = root.job("c1", 1);
    j["promote"] = "never".into();
    let id = root.submit("j.json", &j);
    let st = wait_state(&root, &id, &["completed", "failed", "cancelled"], LONG);
    drop(d);
    assert_eq!(st["state"], "completed", "{st}");
    let tensors = root.dir.join("runs").join(&id).join("adapter/adapter_model.safetensors");
    flip(&tensors);
    let out = root.cli_cmd(["promote", &id]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged adapter was promoted");
    assert!(err.contains("adapter_model.safetensors") && err.contains("damaged"), "{err}");
    assert!(!root.dir.join("models/c1/current").exists(), "current changed");
    flip(&tensors);
    let out = root.cli_cmd(["promote", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let score = |root: &Root| root.cli_cmd(["score", "--corpus", "c1", "--query", "q", "--doc", "d"]).output().unwrap();
    assert!(score(&root).status.success());
    flip(&root.dir.join("models/c1/adapters").join(&id).join("adapter_model.safetensors"));
    let out = score(&root);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged adapter was scored with");
    assert!(err.contains("adapter_model.safetensors") && err.contains("damaged"), "{err}");
}
