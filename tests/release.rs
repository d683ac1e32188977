//! Release hygiene: one version for the binary, the crate, the Python and TypeScript clients and
//! the dashboard's package, a CHANGELOG entry for it, the licence the packages declare, and
//! `--version` naming the commit.

use std::path::Path;
use std::process::Command;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("{}: {error}", full.display()))
}

#[test]
fn every_package_has_the_crates_version() {
    let pyproject: toml::Table = toml::from_str(&read("clients/python/pyproject.toml")).unwrap();
    assert_eq!(
        pyproject["project"]["version"].as_str(),
        Some(VERSION),
        "clients/python/pyproject.toml"
    );
    for path in ["clients/node/package.json", "dashboard/package.json"] {
        let package: serde_json::Value = serde_json::from_str(&read(path)).unwrap();
        assert_eq!(package["version"].as_str(), Some(VERSION), "{path}");
    }
}

#[test]
fn the_changelog_has_an_entry_for_this_version() {
    let changelog = read("CHANGELOG.md");
    assert!(
        changelog.contains(&format!("\n## [{VERSION}] - ")),
        "CHANGELOG.md has no `## [{VERSION}] - <date>` entry"
    );
    assert!(changelog.contains("\n## [Unreleased]\n"));
}

#[test]
fn the_licence_is_the_declared_apache_2_0() {
    assert!(read("LICENSE").contains("Apache License\n                        Version 2.0"));
    assert!(read("Cargo.toml").contains("license = \"Apache-2.0\""));
    let package: serde_json::Value =
        serde_json::from_str(&read("clients/node/package.json")).unwrap();
    assert_eq!(package["license"], "Apache-2.0");
    let pyproject: toml::Table = toml::from_str(&read("clients/python/pyproject.toml")).unwrap();
    assert_eq!(pyproject["project"]["license"].as_str(), Some("Apache-2.0"));
}

#[test]
fn version_names_the_release_and_the_commit() {
    let output = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let commit = text
        .trim()
        .strip_prefix(&format!("eventbus {VERSION} (commit "))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("eventbus --version printed {text:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{commit}"
    );
}

/// The packages `name` depends on, directly or not, as Cargo.lock records them (every kind of
/// dependency, with the features the whole workspace turns on: an upper bound of what a
/// client-only build compiles).
fn locked_dependencies(name: &str) -> std::collections::BTreeSet<String> {
    let lock: toml::Table = toml::from_str(&read("Cargo.lock")).unwrap();
    let packages = lock["package"].as_array().unwrap();
    let deps_of = |package: &str| -> Vec<String> {
        packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(package))
            .flat_map(|p| {
                p.get("dependencies")
                    .and_then(|d| d.as_array())
                    .cloned()
                    .unwrap_or_default()
            })
            // "name" or "name version" when several versions are locked.
            .filter_map(|d| d.as_str().map(|d| d.split(' ').next().unwrap().to_owned()))
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = deps_of(name);
    while let Some(next) = todo.pop() {
        if seen.insert(next.clone()) {
            todo.extend(deps_of(&next));
        }
    }
    seen
}

#[test]
fn the_rust_client_crate_depends_on_nothing_of_the_server() {
    let deps = locked_dependencies("eventbus-client");
    assert!(deps.contains("tonic") && deps.contains("prost"), "{deps:?}");
    for server_only in [
        "eventbus",
        "clap",
        "toml",
        "tracing-subscriber",
        "tonic-reflection",
        "rust-embed",
        "opentelemetry",
        "argon2",
        "crc32c",
        "async-nats",
        "prometheus-client",
    ] {
        assert!(
            !deps.contains(server_only),
            "eventbus-client pulls in {server_only}, a server dependency"
        );
    }
}
