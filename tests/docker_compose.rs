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
