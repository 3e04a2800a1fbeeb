//! The function binaries the end-to-end tests run (under [`crate::runtime`]'s emulator).
//!
//! They are the ones `cargo test --workspace` builds next to the test executable (each
//! function package has integration tests, so cargo builds its binary). A nested
//! `cargo build -p ...` would unify features differently and rebuild the AWS SDK on every
//! run, so instead the test refuses a binary older than the sources it is built from.

use std::path::{Path, PathBuf};

/// The four function binaries.
pub const FUNCTIONS: [&str; 4] = [
    "tidemark-export",
    "tidemark-manifest",
    "tidemark-verify",
    "tidemark-prune",
];

/// Where cargo put this test's executable's sibling binaries (`target/debug`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The newest modification time of the Rust sources and manifests under `dir`, outside
/// `tests/` folders.
fn newest_source(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let modified = if path.is_dir() {
            // Tests are not part of a binary.
            if path.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        } else {
            continue;
        };
        newest = newest.max(modified);
    }
    newest
}

/// Fails the test if a function binary is missing or older than its sources.
pub fn check_binaries(workspace: &Path, bin: &Path) {
    let sources = ["shared/src", "functions"]
        .iter()
        .map(|d| newest_source(&workspace.join(d)))
        .max()
        .unwrap_or(std::time::UNIX_EPOCH);
    for name in FUNCTIONS {
        let built = std::fs::metadata(bin.join(name)).and_then(|m| m.modified());
        assert!(
            built.is_ok_and(|t| t >= sources),
            "{} is missing or older than its sources: run `cargo test --workspace` \
             (or `cargo build -p {name}`) first",
            bin.join(name).display()
        );
    }
}
