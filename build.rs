//! Generates the `eventbus.v1` Rust code from `proto/` with the pure-Rust `protox` compiler, so a
//! fresh machine needs no system `protoc`. The encoded descriptor set is written next to the
//! generated code for gRPC server reflection (`compile_fds` does not write it).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/eventbus/v1/eventbus.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("eventbus_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".eventbus.v1.Event.data")
        .codec_path("crate::pb::codec::BusCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
