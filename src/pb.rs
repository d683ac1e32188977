//! The generated `eventbus.v1` wire types and gRPC stubs, in one place. Nothing outside the
//! service adapter ([`crate::service`]) and the SDK ([`crate::sdk`]) should need them.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eventbus.v1");

/// The encoded descriptor set of `eventbus.v1` (and what it imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/eventbus_descriptor.bin"));
