//! The Rust SDK: a client of the bus over gRPC, used by the CLI and by the services in `clients/`.
