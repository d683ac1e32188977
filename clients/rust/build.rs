//! Generates the `eventbus.v1` message types and client stubs from `proto/` (two levels up) with
//! the pure-Rust `protox` compiler, so building needs no system `protoc`. The bus's crate
//! generates its server stubs over these same types (`extern_path`), so a message is one type
//! on both sides.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let proto = "../../proto/eventbus/v1/eventbus.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], [proto_root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".eventbus.v1.Event.data")
        .codec_path("crate::pb::codec::ClientCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
