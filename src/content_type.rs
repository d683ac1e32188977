//! Only gRPC reaches the services: a request whose `content-type` is not `application/grpc`
//! (or `application/grpc+<codec>`) is answered HTTP 415 Unsupported Media Type, as the gRPC
//! over HTTP/2 spec says a server should, with a gRPC status too (INVALID_ARGUMENT
//! `malformed-request`) for clients that read only that.
//!
//! tonic itself does not look at the content-type: without this, an HTTP/2 client that posts
//! JSON (or anything) to a method path has its body decoded as protobuf and may get HTTP 200,
//! which a non-gRPC client reads as success. `tests/h2_abuse.rs` sends such requests.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::Status;

use crate::error::BusError;

/// Refuses requests that are not gRPC (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnlyLayer;

impl<S> tower_layer::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> GrpcOnly<S> {
        GrpcOnly { inner }
    }
}

/// The service [`GrpcOnlyLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcOnly<S> {
    inner: S,
}

/// Whether `content_type` names gRPC: `application/grpc`, optionally `+codec` or `;params`.
pub fn is_grpc(content_type: Option<&http::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(rest) = value.strip_prefix("application/grpc") else {
        return false;
    };
    rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
}

impl<S, B> Service<http::Request<B>> for GrpcOnly<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let content_type = request.headers().get(http::header::CONTENT_TYPE);
        if is_grpc(content_type) {
            return Either::Right(self.inner.call(request));
        }
        let shown = content_type.map_or_else(
            || "none".to_owned(),
            |v| String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
        let status = Status::from(BusError::MalformedRequest {
            message: request.uri().path().to_owned(),
            detail: format!("content-type {shown:?} is not application/grpc"),
        });
        let mut response: http::Response<Body> = status.into_http();
        *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Either::Left(futures_util::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_recognised() {
        let is = |text: &str| is_grpc(Some(&http::HeaderValue::from_str(text).unwrap()));
        assert!(is("application/grpc"));
        assert!(is("application/grpc+proto"));
        assert!(is("application/grpc;charset=utf-8"));
        assert!(!is("application/json"));
        assert!(!is("application/grpcx"));
        assert!(!is("application/grpc-web"));
        assert!(!is("text/plain"));
        assert!(!is_grpc(None));
    }
}
