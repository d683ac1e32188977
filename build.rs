//! Generates the `eventbus.v1` Rust code from `proto/` with the pure-Rust `protox` compiler, so a
//! fresh machine needs no system `protoc`. The encoded descriptor set is written next to the
//! generated code for gRPC server reflection (`compile_fds` does not write it).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    git_commit();
    let proto = "proto/eventbus/v1/eventbus.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("eventbus_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // The server stubs only: the message types and client stubs come from `eventbus-client`
    // (`clients/rust`), so the bus and its SDK share one type per message.
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".eventbus.v1", "::eventbus_client::pb")
        .codec_path("crate::pb::codec::BusCodec")
        .compile_fds(descriptors)?;
    Ok(())
}

/// Sets `EVENTBUS_GIT_COMMIT` (shown by `GetServerInfo`) to the checkout's commit, or `unknown`
/// outside a git checkout or without git, and reruns when the checked-out commit moves.
fn git_commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EVENTBUS_GIT_COMMIT={commit}");
    // HEAD names the branch; the branch's ref (loose, or packed) moves on each commit. Only
    // files that exist are watched: cargo reruns the script every build for a missing one.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
