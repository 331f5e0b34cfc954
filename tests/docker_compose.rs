//! docker-compose.yml is kept correct by reading it (Docker does not run on the build machines):
//! valid YAML, and the services, health check, dependency and environment the README promises.

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml at the repository root");
    let mut docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn redis_service_has_a_health_check() {
    let c = compose();
    let redis = &c["services"]["redis"];
    let image = redis["image"].as_str().expect("redis image");
    assert!(image.starts_with("redis:"), "official image: {image}");
    let test = strings(&redis["healthcheck"]["test"]);
    assert!(
        test.iter().any(|t| t == "ping"),
        "health check pings: {test:?}"
    );
}

#[test]
fn app_runs_the_flagship_with_four_workers_after_redis_is_healthy() {
    let c = compose();
    let app = &c["services"]["app"];
    assert_eq!(
        app["depends_on"]["redis"]["condition"].as_str(),
        Some("service_healthy")
    );
    let env = &app["environment"];
    assert_eq!(env["REDIS_URL"].as_str(), Some("redis://redis:6379"));
    // `HERD_SECRET:` with no value: compose passes the variable through when it is set and leaves
    // it unset otherwise. `${HERD_SECRET:-}` would set it to "" in the container instead.
    let env_map = env.as_hash().expect("environment is a map");
    assert!(
        matches!(
            env_map.get(&Yaml::String("HERD_SECRET".into())),
            Some(Yaml::Null)
        ),
        "HERD_SECRET must be passed through without a value, got {:?}",
        env_map.get(&Yaml::String("HERD_SECRET".into()))
    );
    let cmd = strings(&app["command"]);
    assert_eq!(
        cmd,
        ["--workers", "4", "--port", "3000", "--host", "0.0.0.0"],
        "4 workers on port 3000"
    );
    assert_eq!(strings(&app["ports"]), ["3000:3000"]);
    let dockerfile = app["build"]["dockerfile_inline"]
        .as_str()
        .expect("inline Dockerfile");
    assert!(dockerfile.contains("--example multi_worker"));
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.contains("cargo build"))
            .all(|l| l.contains("--locked")),
        "the image builds with the versions of Cargo.lock: {dockerfile}"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"multi_worker\"]"));
    // Every path the build copies exists in the repository.
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(path.exists(), "{line}: {src} does not exist");
        }
    }
}

#[test]
fn the_build_context_leaves_out_build_output_and_history() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore"))
        .expect(".dockerignore next to docker-compose.yml");
    let entries: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target", "bench/target", ".git"] {
        assert!(
            entries.contains(&needed),
            "{needed} missing from .dockerignore: {entries:?}"
        );
    }
    // The build context (".") stays the repository root, where .dockerignore applies.
    let c = compose();
    assert_eq!(c["services"]["app"]["build"]["context"].as_str(), Some("."));
}

#[test]
fn the_lb_profile_runs_two_hosts_behind_haproxy_with_the_shared_config() {
    let c = compose();
    let services = &c["services"];
    let hosts = ["app1", "app2"];
    for name in hosts {
        let host = &services[name];
        assert_eq!(
            strings(&host["profiles"]),
            ["lb"],
            "{name} is in the lb profile"
        );
        // The same image as `app` (one build section, shared through a YAML anchor).
        assert_eq!(
            host["build"], services["app"]["build"],
            "{name} builds the flagship"
        );
        assert_eq!(
            strings(&host["command"]),
            ["--workers", "2", "--port", "3000", "--host", "0.0.0.0"],
            "{name}: 2 workers on port 3000 of its container"
        );
        assert_eq!(
            host["depends_on"]["redis"]["condition"].as_str(),
            Some("service_healthy")
        );
        let env = host["environment"].as_hash().expect("environment is a map");
        let get = |k: &str| env.get(&Yaml::String(k.into()));
        assert_eq!(
            get("REDIS_URL").and_then(Yaml::as_str),
            Some("redis://redis:6379")
        );
        // Passed through without a value: every host must get the same key from the operator.
        assert!(matches!(get("HERD_SECRET"), Some(Yaml::Null)), "{name}");
        let lame_ms: u64 = get("HERD_LAME_DUCK_MS")
            .and_then(Yaml::as_str)
            .and_then(|v| v.parse().ok())
            .expect("HERD_LAME_DUCK_MS, in milliseconds");
        // The stop grace covers the lame duck and the drain (30 s by default).
        let grace: u64 = host["stop_grace_period"]
            .as_str()
            .and_then(|g| g.strip_suffix('s'))
            .and_then(|g| g.parse().ok())
            .expect("stop_grace_period in seconds");
        assert!(grace * 1000 >= lame_ms + 30_000, "{name}: grace {grace}s");
        // Only the balancer is published.
        assert!(host["ports"].is_badvalue(), "{name} publishes no port");
    }
    let lb = &services["lb"];
    assert_eq!(strings(&lb["profiles"]), ["lb"]);
    let image = lb["image"].as_str().expect("lb image");
    assert!(
        image.starts_with("haproxy:"),
        "official HAProxy image: {image}"
    );
    assert_eq!(strings(&lb["ports"]), ["8080:8080"]);
    assert_eq!(strings(&lb["depends_on"]), hosts);
    let volumes = strings(&lb["volumes"]);
    let mount = volumes
        .iter()
        .find(|v| v.ends_with(":/usr/local/etc/haproxy/haproxy.cfg:ro"))
        .expect("the config mounted where the official image reads it");
    let file = mount.split(':').next().expect("host path");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let cfg = std::fs::read_to_string(&path).expect("the mounted haproxy config exists");
    // The config sends to both hosts on their port, checks /healthz, listens on the published port.
    for host in hosts {
        assert!(
            cfg.lines()
                .any(|l| l.trim() == format!("server {host} {host}:3000")),
            "{file} has no server line for {host}"
        );
    }
    assert!(cfg.contains("uri /healthz"), "{file} checks /healthz");
    assert!(
        cfg.lines().any(|l| l.trim() == "bind :8080"),
        "{file} binds 8080"
    );
    // The default profile still runs the flagship alone.
    assert!(services["app"]["profiles"].is_badvalue());
    assert!(services["redis"]["profiles"].is_badvalue());
}
