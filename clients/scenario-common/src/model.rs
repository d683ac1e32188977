//! The scenario's payloads, as `docs/scenario-protocol.md` defines them. Every service in every
//! language speaks exactly this, so any implementation can stand in for another.

use serde::{Deserialize, Serialize};

/// Query topics (request/reply) and change-event topics.
pub mod topics {
    pub const USER_QUERY: &str = "user.query";
    pub const ORDER_QUERY: &str = "order.query";
    pub const PRODUCT_QUERY: &str = "product.query";
    pub const ORDER_CREATE: &str = "order.create";
    pub const USER_CREATED: &str = "user.created";
    pub const PRODUCT_CREATED: &str = "product.created";
    pub const ORDER_CREATED: &str = "order.created";
}

/// The services' names: their `source`, and the consumer group their replicas share.
pub mod services {
    pub const USER: &str = "user-service";
    pub const PRODUCT: &str = "product-service";
    pub const ORDER: &str = "order-service";
    pub const QUERY: &str = "query-service";
}

/// A user, owned by user-service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub created_at: String,
}

/// A product, owned by product-service. Money is integer cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub price_cents: i64,
    pub created_at: String,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: i64,
    pub quantity: i64,
}

/// An order, owned by order-service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub created_at: String,
    pub items: Vec<OrderItem>,
}

/// `user.query` and `order.query` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByUser {
    pub user_id: i64,
}

/// `user.query` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserReply {
    pub user: User,
}

/// `order.query` reply: every order of the user, oldest first (empty for a user with none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrdersReply {
    pub orders: Vec<Order>,
}

/// `product.query` request: all the ids in one query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductQuery {
    pub product_ids: Vec<i64>,
}

/// `product.query` reply: the products found, and the ids that were not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductsReply {
    pub products: Vec<Product>,
    pub missing: Vec<i64>,
}

/// `order.create` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrder {
    pub user_id: i64,
    pub items: Vec<OrderItem>,
}

/// `order.create` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderReply {
    pub order: Order,
}

/// The code of an error reply (also its `error` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The thing asked for does not exist (e.g. an unknown user).
    NotFound,
    /// The request breaks a rule: malformed JSON, a missing field, quantity < 1, an unknown
    /// product.
    Invalid,
    /// A dependency of the answering service did not answer.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Parses a wire code; unknown codes are `internal`.
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "not_found" => ErrorCode::NotFound,
            "invalid" => ErrorCode::Invalid,
            "unavailable" => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply's `data`: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// The stable id of a change event, so consumers can deduplicate: `user-7-created`.
pub fn change_event_id(kind: &str, id: i64) -> String {
    format!("{kind}-{id}-created")
}

/// The current time as the protocol writes times: RFC 3339, UTC, whole seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_has_the_protocol_shape() {
        let reply = ErrorReply {
            error: ErrorDetail {
                code: ErrorCode::NotFound,
                message: "unknown user 7".into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"error":{"code":"not_found","message":"unknown user 7"}}"#
        );
        for code in [
            ErrorCode::NotFound,
            ErrorCode::Invalid,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
    }
}
