//! The layering docs/design.md states, checked on the source: no file imports from a file that
//! imports it back (directly or around a longer circle), and no module imports from a layer
//! above its own. A reference is a path that starts with `crate::`, `super::` or `self::` outside
//! comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first, as docs/design.md's table gives them.
const LAYERS: [&[&str]; 7] = [
    &["model", "ids", "budget", "settings", "sys", "testhooks"],
    &["store"],
    &["job", "config", "report"],
    &["train"],
    &["daemon"],
    &["serve", "runner"],
    &["cli"],
];

fn layer(module: &str) -> usize {
    let top = module.split("::").next().unwrap_or("");
    LAYERS.iter().position(|l| l.contains(&top)).unwrap_or(LAYERS.len())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` -> `a::b`, `src/a/mod.rs` -> `a`, `src/lib.rs` -> `` (main.rs is skipped).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    match parts.as_slice() {
        [only] if only == "main" => None,
        [only] if only == "lib" => Some(String::new()),
        [dirs @ .., last] if last == "mod" => Some(dirs.join("::")),
        all => Some(all.join("::")),
    }
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The modules `module`'s code refers to through `crate::`, `super::` and `self::` paths (and the
/// items of `use crate::x::{a, b}` groups), each resolved to the longest known module prefix.
fn references(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let base: Vec<&str> = if module.is_empty() { Vec::new() } else { module.split("::").collect() };
    let resolve = |path: &[&str]| -> Option<String> {
        let mut segs: Vec<&str> = match *path.first()? {
            "crate" => path[1..].to_vec(),
            "self" => base.iter().copied().chain(path[1..].iter().copied()).collect(),
            "super" => {
                let ups = path.iter().take_while(|s| **s == "super").count();
                let keep = base.len().checked_sub(ups)?;
                base[..keep].iter().copied().chain(path[ups..].iter().copied()).collect()
            }
            _ => return None,
        };
        while !segs.is_empty() {
            let m = segs.join("::");
            if modules.contains(&m) {
                return Some(m);
            }
            segs.pop();
        }
        None
    };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || !ident(bytes[i - 1]);
        let rest: String = bytes[i..bytes.len().min(i + 8)].iter().collect();
        if at_word && (rest.starts_with("crate::") || rest.starts_with("super::") || rest.starts_with("self::")) {
            let mut j = i;
            while j < bytes.len() && (ident(bytes[j]) || bytes[j] == ':') {
                j += 1;
            }
            let path: String = bytes[i..j].iter().collect();
            let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            if let Some(m) = resolve(&segs) {
                out.insert(m);
            }
            // `use crate::x::{a, b::c}`: each item may be a module of its own.
            if path.ends_with("::") && bytes.get(j) == Some(&'{') {
                let close = bytes[j..].iter().position(|&c| c == '}').map_or(bytes.len(), |p| j + p);
                let group: String = bytes[j + 1..close].iter().collect();
                for item in group.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "self") {
                    let first = item.split("::").next().unwrap_or("");
                    segs.push(first);
                    if let Some(m) = resolve(&segs) {
                        out.insert(m);
                    }
                    segs.pop();
                }
            }
            i = j;
        } else {
            i += 1;
        }
    }
    // A module declares its children; that is no import.
    out.retain(|m| m != module && !module.starts_with(&format!("{m}::")) && !m.is_empty());
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let texts: BTreeMap<String, String> =
        files.iter().filter_map(|f| Some((module_of(&src, f)?, code(&std::fs::read_to_string(f).unwrap())))).collect();
    let modules: BTreeSet<String> = texts.keys().cloned().collect();
    texts.iter().map(|(m, t)| (m.clone(), references(m, t, &modules))).collect()
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let g = graph();
    assert!(g.len() > 50, "the source was not found: {} modules", g.len());
    let up: Vec<String> = g
        .iter()
        .flat_map(|(a, refs)| refs.iter().filter(|b| layer(b) > layer(a)).map(move |b| format!("{a} -> {b}")))
        .collect();
    assert!(up.is_empty(), "imports from a higher layer: {up:?}");
}

/// The three processes share no code of each other's: the daemon, a run and serve meet only in
/// the store (and the layers under it).
#[test]
fn the_daemon_a_run_and_serve_import_nothing_of_each_other() {
    let g = graph();
    let process =
        |m: &str| ["daemon", "runner", "serve"].into_iter().find(|p| m == *p || m.starts_with(&format!("{p}::")));
    let crossing: Vec<String> = g
        .iter()
        .flat_map(|(a, refs)| refs.iter().map(move |b| (a, b)))
        .filter(|(a, b)| matches!((process(a), process(b)), (Some(x), Some(y)) if x != y))
        .map(|(a, b)| format!("{a} -> {b}"))
        .collect();
    assert!(crossing.is_empty(), "one process's code imported by another: {crossing:?}");
}

#[test]
fn no_file_imports_from_a_file_that_imports_it_back() {
    let g = graph();
    // A circle is a module that reaches itself; report each one found.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = g[from].iter().collect();
        while let Some(m) = todo.pop() {
            if seen.insert(m.clone()) {
                todo.extend(g.get(m).into_iter().flatten());
            }
        }
        seen
    };
    let circles: Vec<&String> = g.keys().filter(|m| reach(m).contains(*m)).collect();
    assert!(circles.is_empty(), "files on an import circle: {circles:?}");
    // And the check can see one: the store's modules refer to each other in one direction.
    assert!(g["store::status"].contains("store::state") && !g["store::state"].contains("store::status"));
}
