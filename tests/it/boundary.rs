//! The store's boundary (issue 27): no SQLite type outside `src/store`, and
//! the store's submodules private, so every reader and writer goes through
//! `Store` / `ReadOnlyStore` and their typed methods.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn rusqlite_is_named_only_inside_the_store() {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("pgmirror/sink.rs")),
        "found the sources"
    );
    let store = src.join("store");
    let leaks: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(&store))
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            let lines: Vec<String> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| l.contains("rusqlite"))
                .map(|(i, l)| format!("{}:{}: {}", f.display(), i + 1, l.trim()))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "rusqlite outside src/store:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn the_store_keeps_its_submodules_private() {
    let text = std::fs::read_to_string(src().join("store/mod.rs")).expect("read store/mod.rs");
    let public: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("pub mod ") || l.starts_with("pub(crate) mod ")
        })
        .collect();
    assert!(
        text.contains("\nmod outbox;"),
        "store/mod.rs declares its submodules"
    );
    assert!(public.is_empty(), "public store submodules: {public:?}");
}
