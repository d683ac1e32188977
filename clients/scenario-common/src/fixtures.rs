//! The committed seed data (`clients/fixtures/*.json`, made by `generate.py` there), embedded at
//! build time so a service seeds the same data wherever it runs from.

use crate::model::{Order, Product, User};

const USERS: &str = include_str!("../../fixtures/users.json");
const PRODUCTS: &str = include_str!("../../fixtures/products.json");
const ORDERS: &str = include_str!("../../fixtures/orders.json");

/// The 50 seed users.
pub fn users() -> Vec<User> {
    serde_json::from_str(USERS).expect("clients/fixtures/users.json is valid")
}

/// The 200 seed products.
pub fn products() -> Vec<Product> {
    serde_json::from_str(PRODUCTS).expect("clients/fixtures/products.json is valid")
}

/// The 1,000 seed orders.
pub fn orders() -> Vec<Order> {
    serde_json::from_str(ORDERS).expect("clients/fixtures/orders.json is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_parse_and_refer_to_each_other() {
        let (users, products, orders) = (users(), products(), orders());
        assert_eq!((users.len(), products.len(), orders.len()), (50, 200, 1000));
        for order in &orders {
            assert!(users.iter().any(|u| u.id == order.user_id));
            assert!(!order.items.is_empty());
            for item in &order.items {
                assert!(item.quantity >= 1);
                assert!(products.iter().any(|p| p.id == item.product_id));
            }
        }
    }
}
