//! The files in `examples/` are the user-facing documentation of the config format. This test
//! keeps them honest: each one parses without a single error, and together they show every
//! key the config reader knows, so a new key cannot ship undocumented.

use std::collections::BTreeSet;
use std::path::PathBuf;

use warren::config::{known_keys, parse_config};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every `*.toml` file in `examples/`, sorted, with its text.
fn example_files() -> Vec<(PathBuf, String)> {
    let dir = examples_dir();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, String)> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path()
        })
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (path, text)
        })
        .collect();
    files.sort();
    files
}

/// The path of every non-table value in `table`, one segment per key (entry names included).
fn leaf_paths(prefix: &[String], table: &toml::Table, out: &mut Vec<Vec<String>>) {
    for (key, value) in table {
        let mut path = prefix.to_vec();
        path.push(key.clone());
        match value {
            toml::Value::Table(sub) => leaf_paths(&path, sub, out),
            _ => out.push(path),
        }
    }
}

/// `server.services.*.bind_addr` matches `["server", "services", "ssh", "bind_addr"]`.
fn matches(pattern: &str, path: &[String]) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    pattern.len() == path.len() && pattern.iter().zip(path).all(|(p, s)| *p == "*" || p == s)
}

#[test]
fn every_example_parses_without_errors() {
    let files = example_files();
    assert!(
        files.len() >= 4,
        "expected at least 4 example files in {}, found {}",
        examples_dir().display(),
        files.len()
    );
    let mut failures = Vec::new();
    for (path, text) in &files {
        if let Err(errors) = parse_config(text) {
            failures.push(format!("{}:\n{errors}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn examples_show_both_roles() {
    let parsed: Vec<_> = example_files()
        .iter()
        .filter_map(|(_, text)| parse_config(text).ok())
        .collect();
    assert!(
        parsed.iter().any(|f| f.server.is_some()),
        "no server example"
    );
    assert!(
        parsed.iter().any(|f| f.client.is_some()),
        "no client example"
    );
}

#[test]
fn examples_document_every_known_key() {
    let mut found = Vec::new();
    for (path, text) in example_files() {
        let table: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        leaf_paths(&[], &table, &mut found);
    }

    let missing: Vec<&str> = known_keys()
        .iter()
        .copied()
        .filter(|key| !found.iter().any(|path| matches(key, path)))
        .collect();
    assert!(
        missing.is_empty(),
        "keys not shown in any examples/*.toml: {missing:?}"
    );

    // The reverse direction: parsing already rejects unknown keys, but say it plainly.
    let unknown: BTreeSet<String> = found
        .iter()
        .filter(|path| !known_keys().iter().any(|key| matches(key, path)))
        .map(|path| path.join("."))
        .collect();
    assert!(
        unknown.is_empty(),
        "example keys the reader does not know: {unknown:?}"
    );
}
