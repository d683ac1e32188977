//! The one error type of the SDK. It keeps the bus's `tonic::Status` (code and message) rather
//! than flattening it into a string, so callers can branch on what happened (no responders,
//! timeout, bad input) and the CLI can print it on one line.

use tonic::Code;

use crate::pb;

/// The metadata key under which the bus sends a stable reason with each error status.
pub const ERROR_REASON_KEY: &str = "eventbus-error";

/// Result of SDK calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to the bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server URL could not be parsed.
    #[error("invalid server url {url:?}")]
    InvalidUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection to the bus could not be made.
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS settings cannot be used: a CA or client certificate file that cannot be read
    /// or holds no PEM.
    #[error("tls settings for {url}: {why}")]
    Tls {
        /// The URL the settings were for.
        url: String,
        /// What is wrong, naming the file.
        why: String,
    },
    /// The bearer token cannot be sent: it is not a valid header value (control characters).
    #[error("the token is not a valid header value (control characters?)")]
    InvalidToken,
    /// The bus answered a call with an error status (or the transport failed under it).
    #[error("{}", describe_status(.0))]
    Status(tonic::Status),
    /// The publish stream broke while this event's batch was in flight. The batch may or may
    /// not have been stored: it is not retried, so that nothing is stored twice.
    #[error("publish stream broke before the batch was acknowledged (it may or may not be stored): {}", describe_status(.0))]
    StreamBroken(tonic::Status),
    /// The handler answering a query reported an error (see [`crate::ERROR_ATTRIBUTE`]).
    #[error("the responder on {topic} failed: {message}")]
    Remote {
        /// The query's topic.
        topic: String,
        /// The responder's error message.
        message: String,
        /// The whole error reply.
        reply: Box<pb::Event>,
    },
    /// Event data could not be encoded as JSON.
    #[error("cannot encode event data as json")]
    Json(#[from] serde_json::Error),
    /// The batching publisher was closed before the event was handed over.
    #[error("the publisher is closed")]
    PublisherClosed,
    /// The bus sent something the SDK does not expect from this protocol version.
    #[error("unexpected answer from the bus: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(status)
    }
}

impl Error {
    /// The gRPC status code this error stands for. Errors that did not come from the bus map
    /// to the code a gRPC client would see for the same failure: a failed connection is
    /// `Unavailable`, bad input (TLS settings included) is `InvalidArgument`, a closed publisher is `Cancelled`, a
    /// protocol mismatch is `Internal`, and an error reply is `Unknown` (the responder's own).
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidUrl { .. } | Error::Tls { .. } | Error::InvalidToken | Error::Json(_) => {
                Code::InvalidArgument
            }
            Error::Connect { .. } => Code::Unavailable,
            Error::Status(status) | Error::StreamBroken(status) => status.code(),
            Error::Remote { .. } => Code::Unknown,
            Error::PublisherClosed => Code::Cancelled,
            Error::Protocol(_) => Code::Internal,
        }
    }

    /// The bus's status, when the error came from a call.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Status(status) | Error::StreamBroken(status) => Some(status),
            _ => None,
        }
    }

    /// Query found nobody subscribed to its topic (the bus fails fast with UNAVAILABLE).
    pub fn is_no_responders(&self) -> bool {
        let Error::Status(status) = self else {
            return false;
        };
        let reason = status
            .metadata()
            .get(ERROR_REASON_KEY)
            .and_then(|reason| reason.to_str().ok());
        status.code() == Code::Unavailable
            && (reason == Some("no-responders") || status.message().starts_with("no responders"))
    }

    /// The bus's stable reason for the error (`no-responders`, `slow-consumer`,
    /// `shutting-down`, ...), from the `eventbus-error` metadata entry, when it sent one.
    pub fn reason(&self) -> Option<&str> {
        self.status()?
            .metadata()
            .get(ERROR_REASON_KEY)?
            .to_str()
            .ok()
    }

    /// Whether the same call may succeed if made again (on another node of a cluster, or
    /// once the node is back): the node was unreachable, went away mid-call, or had lost its
    /// log (UNAVAILABLE other than `no-responders`, or a transport error, including the
    /// CANCELLED tonic reports when the connection closed under the call). A query that fails
    /// so was not answered; asking again is safe (a query has no effect but its question).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Status(status) | Error::StreamBroken(status) => {
                !self.is_no_responders() && super::client::moves_on(status)
            }
            _ => false,
        }
    }

    /// The call (e.g. a query) ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.code() == Code::DeadlineExceeded
    }

    /// The bus refused the input (bad topic, oversized event, ...).
    pub fn is_invalid_argument(&self) -> bool {
        self.code() == Code::InvalidArgument
    }
}

/// `message (CODE)`, plus the transport cause when there is one, on one line: tonic's own
/// `Display` is meant for logs, not for users.
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    let mut out = if status.message().is_empty() {
        code_name(status.code())
            .to_ascii_lowercase()
            .replace('_', " ")
    } else {
        status.message().to_string()
    };
    let mut cause = std::error::Error::source(status);
    while let Some(err) = cause {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = err.source();
    }
    format!("{out} ({})", code_name(status.code()))
}

/// The canonical upper-case name of a gRPC code, as users see it in docs and grpcurl.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_prints_message_and_code_on_one_line() {
        let err = Error::from(tonic::Status::unavailable(
            "no responders for topic user.query",
        ));
        assert_eq!(
            err.to_string(),
            "no responders for topic user.query (UNAVAILABLE)"
        );
        assert!(err.is_no_responders());
        assert!(!err.is_timeout());
    }

    #[test]
    fn helpers_follow_the_code() {
        let err = Error::from(tonic::Status::deadline_exceeded("no reply on a.b"));
        assert!(err.is_timeout());
        assert!(!err.is_no_responders());
        let err = Error::from(tonic::Status::invalid_argument("topic: empty"));
        assert!(err.is_invalid_argument());
        assert_eq!(err.code(), Code::InvalidArgument);
        // A plain UNAVAILABLE (e.g. shutting down) is not "no responders".
        assert!(!Error::from(tonic::Status::unavailable("shutting down")).is_no_responders());
    }

    #[test]
    fn reason_comes_from_the_metadata() {
        let mut status = tonic::Status::unavailable("the bus is shutting down");
        status.metadata_mut().insert(
            ERROR_REASON_KEY,
            tonic::metadata::MetadataValue::from_static("shutting-down"),
        );
        let err = Error::from(status);
        assert_eq!(err.reason(), Some("shutting-down"));
        assert!(!err.is_no_responders());
    }

    #[test]
    fn empty_message_falls_back_to_the_code() {
        let err = Error::from(tonic::Status::new(Code::Cancelled, ""));
        assert_eq!(err.to_string(), "cancelled (CANCELLED)");
    }
}
