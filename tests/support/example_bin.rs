//! Building an example from the current sources, with this test binary's own profile and features
//! (used by the example tests and, through `launcher_support`, by the launcher tests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The cargo features this test was built with, `default` included: the example is built with
/// exactly these, so that it shares the library build of the test instead of making another.
fn test_features() -> Vec<&'static str> {
    let all = [
        ("default", cfg!(feature = "default")),
        ("launcher", cfg!(feature = "launcher")),
        ("cli", cfg!(feature = "cli")),
        ("cluster", cfg!(feature = "cluster")),
        ("sentinel", cfg!(feature = "sentinel")),
        ("tls", cfg!(feature = "tls")),
        ("metrics", cfg!(feature = "metrics")),
        ("testing", cfg!(feature = "testing")),
    ];
    all.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect()
}

/// `target/<profile>/examples/NAME`, (re)built once per test process with the same profile and
/// features as this test, so that running one test file alone (`cargo test --test NAME`, which
/// builds no example) never runs a stale example binary.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, bin)) = built.iter().find(|(n, _)| n == name) {
        return bin.clone();
    }
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/TEST-HASH
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir");
    let target_dir = profile_dir.parent().expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Cargo gives the test process variables of its own (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...).
    // Build scripts watch some of them (ring: `rerun-if-env-changed=CARGO_MANIFEST_DIR`), so
    // passing them on would rebuild half the dependencies here, and again at the next plain build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let set_for_tests = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ];
        if set_for_tests.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd.args(["build", "--example", name, "--no-default-features"])
        .arg("--features")
        .arg(test_features().join(","))
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build --example");
    assert!(status.success(), "building the {name} example failed");
    let bin = profile_dir.join("examples").join(name);
    assert!(bin.exists(), "{} missing", bin.display());
    built.push((name.to_owned(), bin.clone()));
    bin
}
