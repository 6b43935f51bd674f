//! Property tests of every reader of user input: the job parser, config.toml, and the feedback,
//! triplets and documents readers. Arbitrary bytes and arbitrary JSON never panic, and every
//! rejection of a job or a config names what is wrong.

use proptest::prelude::*;
use rerankd::config::DaemonConfig;
use rerankd::job::parse_job;
use rerankd::train::dataset::{Documents, read_triplets};
use rerankd::train::mining::mine;
use serde_json::{Value, json};

/// Arbitrary JSON values, a few levels deep, with the job's own keys likely to appear.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("corpus".to_string()),
        Just("data".to_string()),
        Just("train".to_string()),
        Just("epochs".to_string()),
        Just("triplets".to_string()),
        Just("lora".to_string()),
        Just("eval".to_string()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn home() -> std::path::PathBuf {
    std::env::temp_dir()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn job_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = parse_job(text, |_| home(), 4096);
        }
    }

    #[test]
    fn job_parser_names_a_field_for_every_bad_object(v in arb_json()) {
        let text = v.to_string();
        if let Err(e) = parse_job(&text, |_| home(), 4096) {
            // A rejection of an object names the field; of a non-object, the whole file.
            prop_assert!(!e.message.is_empty());
            if v.is_object() {
                prop_assert!(e.field.is_some(), "no field named for {text}: {e:?}");
            }
        }
    }

    #[test]
    fn job_parser_names_the_field_of_a_mutated_valid_job(field in 0usize..6, bad in arb_json()) {
        let mut job = json!({"corpus": "c", "data": {"triplets": "/dev/null"}, "train": {"epochs": 1}});
        let path: &[&str] = [&["corpus"][..], &["data"], &["train"], &["train", "epochs"], &["data", "triplets"], &["lora"]][field];
        let mut at = &mut job;
        for k in &path[..path.len() - 1] {
            at = at.get_mut(*k).unwrap();
        }
        at[path[path.len() - 1]] = bad;
        if let Err(e) = parse_job(&job.to_string(), |_| home(), 4096) {
            prop_assert!(e.field.is_some(), "{job}: {e:?}");
        }
    }

    #[test]
    fn config_never_panics_and_names_the_key(key in "[a-z_]{1,20}", value in prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:?}")), any::<i64>().prop_map(|i| i.to_string()),
        Just("inf".to_string()), Just("nan".to_string()), Just("-inf".to_string()), Just("\"x\"".to_string()),
        Just("[1]".to_string()), Just("{a = 1}".to_string())]) {
        let text = format!("{key} = {value}\n");
        if let Err(e) = DaemonConfig::parse(&text) {
            prop_assert!(e.to_string().contains(&key), "{text}: {e}");
        }
    }

    #[test]
    fn config_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = DaemonConfig::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn feedback_mining_never_panics(lines in prop::collection::vec(prop_oneof![
        arb_json().prop_map(|v| v.to_string()), ".{0,60}"], 0..30)) {
        let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
        let _ = mine(&lines.join("\n"), &ids, 3, 0);
    }

    #[test]
    fn triplets_and_documents_readers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), json_rows in prop::collection::vec(arb_json(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.jsonl");
        std::fs::write(&raw, &bytes).unwrap();
        let rows = dir.path().join("rows.jsonl");
        std::fs::write(&rows, json_rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
        for p in [&raw, &rows] {
            if let Err(e) = read_triplets(p, None) {
                prop_assert!(format!("{e:#}").contains(&p.display().to_string()), "{e:#}");
            }
            if let Err(e) = Documents::load(p, 100) {
                prop_assert!(format!("{e:#}").contains(&p.display().to_string()), "{e:#}");
            }
        }
    }
}
