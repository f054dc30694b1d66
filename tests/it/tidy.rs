//! Checks of the repository itself: module docs, no stubs or debug macros in product code, no
//! ignored tests, README's test command is what CI runs, every dependency is explained.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

fn product_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in ["src", "heap/src", "actors/src", "loom-tests/src"] {
        rust_files(&root().join(d), &mut files);
    }
    assert!(files.len() > 10, "tidy found too few files: {files:?}");
    files
}

#[test]
fn every_module_starts_with_a_doc_paragraph() {
    for f in product_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.trim_start().starts_with("//!"), "{} has no //! module doc", f.display());
    }
}

#[test]
fn no_stubs_or_debug_macros_in_product_code() {
    for f in product_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        // Only the code before a file's unit-test module counts.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for bad in ["todo!(", "unimplemented!(", "dbg!("] {
            assert!(!code.contains(bad), "{} contains {bad}", f.display());
        }
    }
}

#[test]
fn no_ignored_tests() {
    let mut files = Vec::new();
    rust_files(&root(), &mut files);
    let needle = ["#[", "ignore]"].concat();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains(&needle), "{} has an ignored test", f.display());
    }
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let cmd = "bash scripts/test-all.sh";
    assert!(readme.lines().any(|l| l.trim() == cmd), "README does not give `{cmd}`");
    assert!(ci.lines().any(|l| l.trim() == cmd), ".ci/run does not run `{cmd}`");
}

#[test]
fn every_dependency_is_explained_in_architecture_md() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    for manifest in ["Cargo.toml", "heap/Cargo.toml", "actors/Cargo.toml", "loom-tests/Cargo.toml"] {
        let text = std::fs::read_to_string(root().join(manifest)).unwrap();
        let mut in_deps = false;
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with('[') {
                in_deps = l.contains("dependencies");
                continue;
            }
            if !in_deps || l.is_empty() || l.starts_with('#') {
                continue;
            }
            let name = l.split(['=', '.', ' ']).next().unwrap().trim();
            if name.starts_with("heapgrid") {
                continue;
            }
            assert!(
                arch.contains(&format!("`{name}`")),
                "{manifest}: dependency `{name}` has no line in ARCHITECTURE.md"
            );
        }
    }
}
