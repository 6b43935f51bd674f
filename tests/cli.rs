//! The command line's own surface: shell completions and the man page.

mod common;

use common::*;

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
