//! `Config::from_env` and `SessionLayer::from_env` against the real process environment. The
//! environment is global to a process, so each case runs this test binary again as a child with
//! exactly the variables it needs (`env_clear`): nothing leaks between cases or in from the shell
//! that runs the tests. The child's answer is one `RESULT:` line on stdout; what herd prints goes
//! to its stderr. (The mapping of every variable is unit-tested in `src/config.rs` and
//! `src/session/signing.rs` over a lookup closure.)

use std::process::Command;

/// Set in the child: run [`child`] instead of the cases.
const CHILD: &str = "HERD_CONFIG_TEST_CHILD";

/// In the child: `Config::from_env()`, a client, `SessionLayer::from_env` applied to a service,
/// and one line saying what came of it.
fn child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let layer = |c: &herd::Config| -> herd::Result<herd::SessionLayer> {
        let layer = herd::SessionLayer::from_env(herd::RedisClient::new(c.clone())?)?;
        let _service = tower::Layer::layer(&layer, ()); // where a missing key is warned about
        Ok(layer)
    };
    match herd::Config::from_env().and_then(|c| Ok((layer(&c)?, c))) {
        Ok((layer, c)) => println!(
            "RESULT: ok url={} prefix={} timeout_ms={} ephemeral={}",
            c.redis_url(),
            c.prefix(),
            c.command_timeout().as_millis(),
            layer.key_is_ephemeral()
        ),
        Err(e) => println!("RESULT: error {e}"),
    }
}

/// Runs `from_env` in a child with only `vars` set; returns its `RESULT:` line and its stderr.
fn from_env_in_child(vars: &[(&str, &str)]) -> (String, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "from_env_reads_the_process_environment",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env_clear()
        .env(CHILD, "1")
        .envs(vars.iter().copied())
        .output()
        .expect("run the test binary as a child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no RESULT line from the child:\n{stdout}\n{stderr}"))
        .to_owned();
    (result, stderr)
}

#[test]
fn from_env_reads_the_process_environment() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let secret = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([5u8; 64])
    };

    // Nothing set: the defaults, a random key, and a warning nobody can miss.
    let (result, stderr) = from_env_in_child(&[]);
    assert_eq!(
        result,
        "ok url=redis://127.0.0.1:6379 prefix=herd timeout_ms=1000 ephemeral=true"
    );
    assert!(
        stderr.contains("WARNING")
            && stderr.contains("HERD_SECRET is not set")
            && stderr.contains("will not survive a restart"),
        "no loud warning about the missing secret: {stderr:?}"
    );

    // Everything set: taken as given, and no warning.
    let (result, stderr) = from_env_in_child(&[
        ("REDIS_URL", "redis://10.1.2.3:7000/1"),
        ("HERD_SECRET", &secret),
        ("HERD_OLD_SECRETS", &secret),
        ("HERD_PREFIX", "app-7"),
        ("HERD_REDIS_TIMEOUT_MS", "333"),
        ("HERD_CONNECT_TIMEOUT_MS", "444"),
        ("HERD_POOL_SIZE", "5"),
        ("HERD_POOL_WAIT_MS", "555"),
    ]);
    assert_eq!(
        result,
        "ok url=redis://10.1.2.3:7000/1 prefix=app-7 timeout_ms=333 ephemeral=false"
    );
    assert!(!stderr.contains("HERD_SECRET"), "{stderr}");

    // Malformed values: a startup error that names the variable.
    for (var, value, says) in [
        (
            "HERD_SECRET",
            "c2hvcnQ=",
            "HERD_SECRET decodes to 5 bytes but needs at least 64",
        ),
        ("HERD_SECRET", "***", "HERD_SECRET is not base64"),
        (
            "REDIS_URL",
            "http://example.com",
            "REDIS_URL `http://example.com`",
        ),
        ("HERD_OLD_SECRETS", "***", "HERD_OLD_SECRETS is not base64"),
        ("HERD_PREFIX", "my app", "HERD_PREFIX: key prefix `my app`"),
        (
            "HERD_REDIS_TIMEOUT_MS",
            "soon",
            "HERD_REDIS_TIMEOUT_MS must be a whole number",
        ),
        (
            "HERD_CONNECT_TIMEOUT_MS",
            "0",
            "HERD_CONNECT_TIMEOUT_MS must be above zero",
        ),
        (
            "HERD_POOL_SIZE",
            "-1",
            "HERD_POOL_SIZE must be a whole number, got `-1`",
        ),
        (
            "HERD_POOL_WAIT_MS",
            "1e3",
            "HERD_POOL_WAIT_MS must be a whole number",
        ),
    ] {
        let (result, _) = from_env_in_child(&[("HERD_SECRET", &secret), (var, value)]);
        assert!(
            result.starts_with("error ") && result.contains(says),
            "{var}={value}: `{result}` should say `{says}`"
        );
    }
}
