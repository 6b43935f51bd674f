//! The command line's own surface: shell completions and the man page.

use crate::common::*;

#[test]
fn completions_and_the_man_page_are_generated_from_the_real_commands() {
    let root = Root::new("");
    for shell in ["bash", "zsh", "fish"] {
        let out = root.cli_cmd(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for sub in ["serve", "export", "feedback", "submit", "watch"] {
            assert!(text.contains(sub), "{shell} completions lack `{sub}`");
        }
        if shell == "bash" {
            let path = root.dir.parent().unwrap().join("rerankd.bash");
            std::fs::write(&path, &text).unwrap();
            let ok = std::process::Command::new("bash").arg("-n").arg(&path).status().unwrap();
            assert!(ok.success(), "the bash completion script does not parse");
        }
    }
    let page = root.dir.parent().unwrap().join("rerankd.1");
    let out = root.cli_cmd(["man", "--out", page.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&page).unwrap();
    assert!(text.contains(".TH rerankd 1") && text.contains("serve") && text.contains("export"), "{text}");
    let out = root.cli_cmd(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// Every non-empty line of `out` is a JSON object.
fn json_lines(what: &str, out: &[u8]) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "{what}: printed nothing");
    assert!(lines.iter().all(|v| v.is_object()), "{what}: {text}");
    lines
}

#[test]
fn every_command_speaks_json_with_the_flag() {
    let root = Root::new("");
    let d = DaemonGuard(root.daemon());
    let job_file = root.dir.parent().unwrap().join("job.json");
    let mut job = root.job("c1", 1);
    job["promote"] = "always".into();
    std::fs::write(&job_file, job.to_string()).unwrap();
    let out = root.cli_cmd(["submit", job_file.to_str().unwrap(), "--wait", "30", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = json_lines("submit", &out.stdout)[0]["run_id"].as_str().unwrap().to_string();
    wait_state(&root, &run, &["completed"], std::time::Duration::from_secs(60));
    let dir = root.dir.parent().unwrap();
    let export_dir = dir.join("export");
    let commands: Vec<Vec<String>> = vec![
        vec!["status".into(), run.clone()],
        vec!["status".into(), "--corpus".into(), "c1".into()],
        vec!["runs".into()],
        vec!["cancel".into(), run.clone()],
        vec!["stop".into(), "c1".into()],
        vec!["promote".into(), run.clone()],
        vec!["doctor".into()],
        vec!["report".into(), run.clone(), "--out".into(), dir.join("r.svg").display().to_string()],
        vec!["pause".into(), run.clone()],
        vec!["install-systemd".into(), "--dest".into(), dir.join("u.service").display().to_string()],
        vec!["install-launchd".into(), "--dest".into(), dir.join("a.plist").display().to_string()],
        vec![
            "score".into(),
            "--corpus".into(),
            "c1".into(),
            "--query".into(),
            "q1".into(),
            "--doc".into(),
            "answer 1".into(),
        ],
        vec![
            "export".into(),
            "--corpus".into(),
            "c1".into(),
            "--format".into(),
            "seq-cls".into(),
            "--out".into(),
            export_dir.display().to_string(),
        ],
    ];
    for args in &commands {
        let out = root.cli_cmd(["--json"]).args(args).output().unwrap();
        let what = args.join(" ");
        json_lines(&what, &out.stdout);
        assert!(out.status.code().is_some_and(|c| c <= 1), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Refusals and errors: JSON on stderr.
    for args in [
        vec!["cancel", "nosuch__20260101_000000"],
        vec!["rollback", "nosuch"],
        vec!["sweep"],
        vec!["promote", "nosuch__20260101_000000"],
        vec!["stop", "../x"],
    ] {
        let out = root.cli_cmd(["--json"]).args(&args).output().unwrap();
        let what = args.join(" ");
        assert!(!out.status.success(), "{what}");
        let e = json_lines(&what, &out.stderr);
        assert!(e[0]["error"].is_string(), "{what}: {:?}", e);
    }
    // `resume` of a run that is not paused is a refusal, as JSON on stderr.
    let out = root.cli_cmd(["--json", "resume", &run]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(json_lines("resume", &out.stderr)[0]["error"].as_str().unwrap().contains("not paused"));
    drop(d);
    let out = root.cli_cmd(["sweep", "--json"]).output().unwrap();
    assert!(json_lines("sweep", &out.stdout)[0]["settled"].is_number());
}

#[test]
fn watch_json_streams_the_events_and_exits_with_the_run() {
    let root = Root::new("");
    let _d = DaemonGuard(root.daemon());
    // --corpus, started before the corpus has any run: it follows the next one.
    let follower =
        root.cli_cmd(["watch", "--corpus", "c1", "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ok = root.submit("ok.json", &root.job("c1", 1));
    let out = follower.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let events = json_lines("watch --corpus", &out.stdout);
    assert_eq!(events[0]["seq"], 0);
    assert!(events.iter().all(|e| e["run_id"] == ok.as_str()), "followed another run");
    assert_eq!(events.last().unwrap()["state"], "completed");
    assert!(events.iter().any(|e| e["type"] == "step"));

    let mut bad = root.job("c2", 1);
    bad["model"] = "/nonexistent/model".into();
    let failed = root.submit("bad.json", &bad);
    let out = root.cli_cmd(["watch", &failed, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_lines("watch failed", &out.stdout).last().unwrap()["state"], "failed");

    let long = root.submit("long.json", &root.job("c3", 1000));
    wait_state(&root, &long, &["running"], std::time::Duration::from_secs(60));
    assert!(root.cli_cmd(["cancel", &long]).output().unwrap().status.success());
    let out = root.cli_cmd(["watch", &long, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(json_lines("watch cancelled", &out.stdout).last().unwrap()["state"], "cancelled");
    // Every run that ended has its picture, whatever the end.
    for id in [&ok, &failed, &long] {
        let svg = root.dir.join("runs").join(id).join("report.svg");
        wait_for(&format!("{id}'s report.svg"), std::time::Duration::from_secs(10), || svg.is_file().then_some(()));
    }
    // In a pipe without --json: the plain lines, same exit code.
    let out = root.cli_cmd(["watch", &ok]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("completed"));
    // On a terminal (a pty from util-linux's `script`): the progress bar's path, same exit codes.
    if std::process::Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success()) {
        for (id, code) in [(&ok, 0), (&failed, 1), (&long, 5)] {
            let cmd = format!("{BIN} --root {} watch {id}", root.dir.display());
            let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
            assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stdout));
        }
    } else {
        eprintln!("SKIPPED: watch on a terminal (no `script` from util-linux here)");
    }
}

/// The `points` of every polyline drawn 2 px wide (the data series and their legend samples),
/// with its stroke colour.
fn series_lines(doc: &roxmltree::Document) -> Vec<(String, usize)> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2"))
        .map(|n| {
            (n.attribute("stroke").unwrap().to_string(), n.attribute("points").unwrap().split_whitespace().count())
        })
        .collect()
}

#[test]
fn a_finished_run_has_a_report_with_every_series() {
    let root = Root::new("");
    let d = DaemonGuard(root.daemon());
    let mut job = root.job("c1", 3);
    job["promote"] = "always".into();
    // A budget that caps the micro-batch, so the report has a cap to show.
    job["memory_budget_mb"] = 256.into();
    job["train"]["batch_size"] = 8.into();
    job["train"]["max_length"] = 4096.into();
    let id = root.submit("r.json", &job);
    wait_state(&root, &id, &["completed"], std::time::Duration::from_secs(120));
    let path = root.dir.join("runs").join(&id).join("report.svg");
    wait_for("report.svg", std::time::Duration::from_secs(10), || path.is_file().then_some(()));
    drop(d);
    let svg = std::fs::read_to_string(&path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("report.svg parses as XML");
    assert!(doc.root_element().has_tag_name("svg"));
    let texts: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).collect();
    let has = |s: &str| texts.iter().any(|t| t.contains(s));
    for want in [
        id.as_str(),
        "Training loss",
        "raw",
        "smoothed",
        "Learning rate",
        "Gradient norm",
        "Step time",
        "Peak memory",
        "Dev ndcg@10 per epoch",
        "baseline",
        "candidate (epoch",
        "promoted:",
        "train.batch_size 8 ->",
        "optimizer step",
        "milliseconds per step",
        "MB",
    ] {
        assert!(has(want), "report.svg has no text `{want}`: {texts:?}");
    }
    let events = root.events(&id);
    let steps = events.iter().filter(|e| e["type"] == "step").count();
    let epochs = events.iter().filter(|e| e["type"] == "eval" && e["which"] == "epoch").count();
    assert_eq!(epochs, 3);
    let lines = series_lines(&doc);
    // loss raw, loss smoothed, learning rate, gradient norm, step time, peak memory: one point a step.
    let full = lines.iter().filter(|(_, n)| *n == steps).count();
    assert_eq!(full, 6, "{steps} steps; series drawn: {lines:?}");
    assert!(lines.iter().any(|(_, n)| *n == epochs), "the per-epoch metric line: {lines:?}");
    // `rerankd report` redraws the same picture.
    let again = root.dir.parent().unwrap().join("again.svg");
    let out = root.cli_cmd(["report", &id, "--out", again.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), svg);
}
