//! The one place domain errors become gRPC statuses. The `match` is exhaustive with no catch-all
//! arm: a new error variant does not compile until someone picks its status on purpose.
//!
//! Besides the code and message, every status carries an `eventbus-error` metadata entry with a
//! stable reason (`no-responders`, `shutting-down`, ...), so clients can tell apart errors that
//! share a code (both of those are UNAVAILABLE) without parsing messages.

use tonic::{Code, Status};

use crate::error::BusError;
use crate::store::StoreError;

/// The metadata key of the stable error reason.
pub use crate::sdk::ERROR_REASON_KEY;

/// The gRPC code and stable reason for an error.
pub fn classify(error: &BusError) -> (Code, &'static str) {
    match error {
        BusError::InvalidArgument { .. } => (Code::InvalidArgument, "invalid-argument"),
        BusError::EventTooLarge { .. } => (Code::InvalidArgument, "event-too-large"),
        BusError::UndeliverableSize { .. } => (Code::InvalidArgument, "event-too-large"),
        BusError::NoResponders { .. } => (Code::Unavailable, "no-responders"),
        BusError::QueryTimeout { .. } => (Code::DeadlineExceeded, "query-timeout"),
        BusError::SlowConsumer { .. } => (Code::ResourceExhausted, "slow-consumer"),
        BusError::SlowGroupMember { .. } => (Code::ResourceExhausted, "slow-group-member"),
        BusError::UnknownGroup { .. } => (Code::NotFound, "unknown-group"),
        BusError::ReplayOverrun { .. } => (Code::ResourceExhausted, "replay-overrun"),
        BusError::MalformedRequest { .. } => (Code::InvalidArgument, "malformed-request"),
        BusError::Internal => (Code::Internal, "internal"),
        BusError::MessageTooLarge { .. } => (Code::OutOfRange, "message-too-large"),
        BusError::ReceiveTimeout { .. } => (Code::DeadlineExceeded, "receive-timeout"),
        BusError::ReceiveBudgetExhausted { .. } => (Code::ResourceExhausted, "receive-budget"),
        BusError::ShuttingDown => (Code::Unavailable, "shutting-down"),
        BusError::GroupOnAnotherNode { .. } => (Code::FailedPrecondition, "group-on-another-node"),
        // Like a lost node: clients move on and rejoin.
        BusError::GroupHomeLost { .. } => (Code::Unavailable, "group-home-lost"),
        BusError::Unauthenticated { .. } => (Code::Unauthenticated, "unauthenticated"),
        BusError::PermissionDenied { .. } => (Code::PermissionDenied, "permission-denied"),
        BusError::LimitExceeded { .. } => (Code::ResourceExhausted, "limit-exceeded"),
        // A failed store refuses every write until a restart: the node is unavailable, and a
        // client may go to another (health says NOT_SERVING too).
        BusError::Storage(StoreError::Failed(_)) => (Code::Unavailable, "store-failed"),
        // gRPC's own words for RESOURCE_EXHAUSTED: "perhaps the entire file system is out of
        // space". Nothing of the batch is stored; health is NOT_SERVING until there is room.
        BusError::Storage(StoreError::Io(error))
            if matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            (Code::ResourceExhausted, "disk-full")
        }
        BusError::Storage(
            StoreError::Io(_)
            | StoreError::Corrupt { .. }
            | StoreError::Metadata { .. }
            | StoreError::Locked { .. },
        ) => (Code::Internal, "storage"),
    }
}

pub fn to_status(error: &BusError) -> Status {
    let (code, reason) = classify(error);
    let mut status = Status::new(code, error.to_string());
    status.metadata_mut().insert(
        ERROR_REASON_KEY,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

impl From<BusError> for Status {
    fn from(error: BusError) -> Status {
        to_status(&error)
    }
}
