# syntax=docker/dockerfile:1
# The eventbus image: the bus (`eventbus`) and the scenario's four services in one image.
#   docker build -t eventbus .
#   docker run -p 50051:50051 -v eventbus-data:/data eventbus            # embedded file store
# deploy/compose.yaml runs a clustered bus (JetStream) and the scenario from this image.
# This file is linted by deploy/tests/test_deploy.py (hadolint and structural checks); it has
# not been built on the development machine, which has no container engine.

# --- build: the release binaries -----------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# protox compiles the proto in build.rs (no protoc); rusqlite bundles SQLite (gcc is in the image).
COPY . .
RUN cargo build --release --locked \
        --bin eventbus \
        --bin user-service --bin order-service --bin product-service --bin query-service

# --- probe: grpc_health_probe, built from a pinned module version ----------------------------
# `go install module@version` verifies the module's contents against the Go checksum database
# (sum.golang.org) before building, so the version pin is also a checksum pin.
FROM golang:1.24-bookworm AS probe
ENV CGO_ENABLED=0 GOFLAGS=-trimpath
RUN go install github.com/grpc-ecosystem/grpc-health-probe@v0.4.24

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 eventbus \
    && useradd --system --uid 10001 --gid eventbus --home-dir /data --shell /usr/sbin/nologin eventbus \
    && mkdir -p /data \
    && chown eventbus:eventbus /data
COPY --from=build /src/target/release/eventbus /src/target/release/user-service \
     /src/target/release/order-service /src/target/release/product-service \
     /src/target/release/query-service /usr/local/bin/
COPY --from=probe /go/bin/grpc-health-probe /usr/local/bin/grpc_health_probe
# 0.0.0.0 so the container's published port reaches it. Without [[principals]] (a --config
# file, SECURITY.md) that is an open bus, and the bus says so at start with a WARN line: publish
# the port on the host's loopback only (`-p 127.0.0.1:50051:50051`) until principals and TLS
# are configured.
ENV EVENTBUS_LISTEN=0.0.0.0:50051 \
    EVENTBUS_DATA_DIR=/data
VOLUME /data
WORKDIR /data
USER 10001:10001
EXPOSE 50051
# grpc.health.v1 for the whole server (service ""): NOT_SERVING once the store failed (a
# clustered node that lost NATS) or while shutting down. Another port than 50051 (other
# EVENTBUS_LISTEN) needs its own HEALTHCHECK; the service containers override it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["grpc_health_probe", "-addr=127.0.0.1:50051", "-connect-timeout=2s", "-rpc-timeout=2s"]
ENTRYPOINT ["eventbus"]
CMD ["serve"]
