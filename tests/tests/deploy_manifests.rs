//! Offline validation of `deploy/`: no Docker engine or cluster runs here, so
//! this parses every manifest and checks what can be checked: one image name,
//! ports and probes agreeing with the listen address in the settings, and
//! every settings key (file or `HANDID__` override) accepted by the server's
//! own settings schema. The last tests break a copy of `deploy/` on purpose
//! and assert the check names the fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use handid_server::settings::Settings;
use serde::Deserialize;
use serde_yaml::Value;

const IMAGE: &str = "handid/server:0.1.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, key| &v[*key])
}

fn port_of(listen: &str) -> u16 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad listen {listen}"))
}

/// Validates a deploy folder; returns the problems found, each naming its file.
fn check_deploy(deploy: &Path, configs: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let k8s = deploy.join("k8s");
    let mut docs: Vec<(String, Value)> = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&k8s)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    for path in names {
        for doc in documents(&path) {
            docs.push((
                path.file_name().expect("name").to_string_lossy().into_owned(),
                doc,
            ));
        }
    }
    let by_kind = |kind: &'static str| docs.iter().filter(move |(_, d)| d["kind"].as_str() == Some(kind));

    // The settings the pods get: the ConfigMap's server.yaml.
    let settings_yaml = by_kind("ConfigMap")
        .find_map(|(_, d)| d["data"]["server.yaml"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let secret_env: Vec<(String, String)> = by_kind("Secret")
        .flat_map(|(_, d)| d["stringData"].as_mapping().cloned().unwrap_or_default())
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect();

    let deployments: Vec<_> = by_kind("Deployment").collect();
    if deployments.len() < 2 {
        problems.push("k8s: expected a CPU and a GPU Deployment".to_owned());
    }
    let mut pod_labels = Vec::new();
    for (file, d) in &deployments {
        pod_labels.push(get(d, &["spec", "template", "metadata", "labels"]).clone());
        let containers = get(d, &["spec", "template", "spec", "containers"])
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        let Some(c) = containers.first() else {
            problems.push(format!("{file}: no container"));
            continue;
        };
        if c["image"].as_str() != Some(IMAGE) {
            problems.push(format!("{file}: image {:?}, expected {IMAGE}", c["image"]));
        }
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
            .chain(secret_env.iter().cloned())
            .collect();
        let settings = match Settings::from_yaml_and_env(&settings_yaml, env) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{file}: settings rejected by the server: {e}"));
                continue;
            }
        };
        let port = settings.server.listen.port();
        let container_ports: Vec<u64> = c["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|p| p["containerPort"].as_u64())
            .collect();
        if container_ports != [u64::from(port)] {
            problems.push(format!(
                "{file}: containerPort {container_ports:?} but the server listens on {port}"
            ));
        }
        for probe in ["readinessProbe", "livenessProbe"] {
            match c[probe]["grpc"]["port"].as_u64() {
                Some(p) if p == u64::from(port) => {}
                other => problems.push(format!(
                    "{file}: {probe} gRPC port {other:?}, server listens on {port}"
                )),
            }
        }
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if args != ["serve", "--config", "/etc/handid/server.yaml"] {
            problems.push(format!("{file}: args {args:?}"));
        }
        let gpu = d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-gpu"));
        let asks_gpu = !c["resources"]["limits"]["nvidia.com/gpu"].is_null();
        if gpu != asks_gpu || (gpu && !settings.model.device.starts_with("cuda")) {
            problems.push(format!(
                "{file}: GPU variant must request nvidia.com/gpu and use a cuda device"
            ));
        }
        if get(
            d,
            &["spec", "template", "spec", "securityContext", "runAsNonRoot"],
        )
        .as_bool()
            != Some(true)
        {
            problems.push(format!("{file}: must run as non-root"));
        }
    }
    for (file, s) in by_kind("Service") {
        for p in s["spec"]["ports"].as_sequence().into_iter().flatten() {
            if p["targetPort"].as_str() != Some("grpc") {
                problems.push(format!(
                    "{file}: targetPort must be the container's named port grpc"
                ));
            }
        }
    }
    for (file, p) in by_kind("PodDisruptionBudget") {
        let selector = &p["spec"]["selector"]["matchLabels"];
        let matches = |labels: &Value| {
            selector
                .as_mapping()
                .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        if !pod_labels.iter().all(matches) {
            problems.push(format!("{file}: selector does not cover every Deployment"));
        }
    }
    if by_kind("Job").count() != 1 {
        problems.push("k8s: expected one migration Job".to_owned());
    }

    // Compose: the server service's overrides applied to the image's settings file.
    let compose = documents(&deploy.join("compose.yaml")).remove(0);
    let server = &compose["services"]["server"];
    let env: BTreeMap<String, String> = server["environment"]
        .as_mapping()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect();
    match Settings::from_yaml_and_env(&read(&configs.join("server.yaml")), env) {
        Ok(settings) => {
            let mapped = format!(":{}", settings.server.listen.port());
            let ports: Vec<&str> = server["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !ports.iter().any(|p| p.ends_with(&mapped)) {
                problems.push(format!(
                    "compose.yaml: ports {ports:?} do not publish the listen port{mapped}"
                ));
            }
        }
        Err(e) => problems.push(format!("compose.yaml: settings rejected by the server: {e}")),
    }
    // The local stack speaks plain text (gRPC, OTLP): nothing of it is
    // published beyond the host's loopback.
    for (name, service) in compose["services"].as_mapping().into_iter().flatten() {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap_or_default();
            if !port.starts_with("127.0.0.1:") {
                problems.push(format!(
                    "compose.yaml: {} publishes {port:?} beyond loopback",
                    name.as_str().unwrap_or("?")
                ));
            }
        }
    }
    for service in ["server", "migrate"] {
        if compose["services"][service]["image"].as_str() != Some(IMAGE) {
            problems.push(format!("compose.yaml: {service} image is not {IMAGE}"));
        }
    }
    for service in ["postgres", "otel-collector"] {
        if compose["services"][service].is_null() {
            problems.push(format!("compose.yaml: no {service} service"));
        }
    }

    // Dockerfile: multi-stage, pinned wheels, non-root, health-checked, exposing the listen port.
    let dockerfile = read(&deploy.join("Dockerfile"));
    if dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() < 2 {
        problems.push("Dockerfile: not multi-stage".to_owned());
    }
    for pin in [
        "torch==2.11.0",
        "nvidia-cuda-runtime==13.0.96",
        "nvidia-cuda-cupti==13.0.85",
    ] {
        if !dockerfile.contains(pin) {
            problems.push(format!("Dockerfile: libtorch wheel pin {pin} missing"));
        }
    }
    if !dockerfile
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root"))
    {
        problems.push("Dockerfile: no non-root USER".to_owned());
    }
    if !dockerfile.contains("HEALTHCHECK") {
        problems.push("Dockerfile: no HEALTHCHECK".to_owned());
    }
    let listen = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENV HANDID__SERVER__LISTEN="))
        .unwrap_or("");
    let exposed = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap_or("");
    if listen.is_empty() || exposed.trim().parse::<u16>().ok() != Some(port_of(listen)) {
        problems.push(format!(
            "Dockerfile: EXPOSE {exposed} does not match HANDID__SERVER__LISTEN={listen}"
        ));
    }

    let unit = read(&deploy.join("systemd/handid-server.service"));
    if !unit.contains("ExecStart=/usr/local/bin/handid-server serve --config") || unit.contains("User=root") {
        problems.push("systemd unit: must run `handid-server serve --config` as a non-root user".to_owned());
    }
    problems
}

#[test]
fn the_committed_deploy_folder_is_consistent() {
    let problems = check_deploy(&repo().join("deploy"), &repo().join("configs"));
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A copy of deploy/ and configs/ to break on purpose.
fn broken_copy(edit: impl Fn(&Path)) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for folder in ["deploy", "configs"] {
        copy_dir(&repo().join(folder), &dir.path().join(folder));
    }
    edit(dir.path());
    check_deploy(&dir.path().join("deploy"), &dir.path().join("configs"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = read(path);
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn a_wrong_probe_port_is_caught() {
    let problems = broken_copy(|root| {
        replace_in(
            &root.join("deploy/k8s/deployment.yaml"),
            "readinessProbe:\n            grpc: {port: 50051}",
            "readinessProbe:\n            grpc: {port: 8080}",
        );
    });
    assert!(
        problems
            .iter()
            .any(|p| p.contains("deployment.yaml: readinessProbe gRPC port Some(8080)")),
        "{problems:#?}"
    );
}

#[test]
fn an_unknown_settings_key_is_caught() {
    let problems = broken_copy(|root| {
        replace_in(
            &root.join("deploy/k8s/configmap.yaml"),
            "max_wait_ms: 5",
            "max_wait_ms: 5\n      max_wiat: 3",
        );
    });
    assert!(
        problems
            .iter()
            .any(|p| p.contains("settings rejected") && p.contains("max_wiat")),
        "{problems:#?}"
    );
}

#[test]
fn an_unknown_environment_override_is_caught() {
    let problems = broken_copy(|root| {
        replace_in(
            &root.join("deploy/compose.yaml"),
            "HANDID__MODEL__PATH:",
            "HANDID__MODEL__PATHS:",
        );
    });
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("compose.yaml: settings rejected")),
        "{problems:#?}"
    );
}

#[test]
fn a_plaintext_listener_other_hosts_reach_is_caught() {
    let problems = broken_copy(|root| {
        replace_in(
            &root.join("deploy/k8s/configmap.yaml"),
            "allow_plaintext: true",
            "allow_plaintext: false",
        );
        replace_in(
            &root.join("deploy/compose.yaml"),
            "HANDID__SERVER__ALLOW_PLAINTEXT: \"true\"",
            "HANDID__SERVER__ALLOW_PLAINTEXT: \"false\"",
        );
    });
    for file in ["deployment.yaml", "deployment-gpu.yaml", "compose.yaml"] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(file) && p.contains("server.allow_plaintext")),
            "{file}: {problems:#?}"
        );
    }
}
