//! The answer of `GET /users/{id}/products`, the same in both modes, and how request-reply mode
//! computes it from the three services' replies (projection mode computes it in SQL).

use std::collections::BTreeMap;

use scenario_common::model::{Order, Product, User};
use serde::{Deserialize, Serialize};

/// The user and the distinct products they ordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProducts {
    /// `request-reply` or `projection`: which style answered.
    pub mode: String,
    pub user: User,
    /// By product id.
    pub products: Vec<OrderedProduct>,
    /// Products the user's orders name but which the product data does not have (yet).
    pub missing_product_ids: Vec<i64>,
}

/// One product a user ordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderedProduct {
    pub product: Product,
    /// Units ordered in all.
    pub quantity: i64,
    /// Orders that contain it.
    pub orders: i64,
    /// `created_at` of the latest such order.
    pub last_ordered_at: String,
}

/// Per product id: (quantity, orders, last ordered at).
pub type Totals = BTreeMap<i64, (i64, i64, String)>;

/// Adds up a user's orders per product.
pub fn totals(orders: &[Order]) -> Totals {
    let mut totals = Totals::new();
    for order in orders {
        for item in &order.items {
            let entry = totals
                .entry(item.product_id)
                .or_insert_with(|| (0, 0, String::new()));
            entry.0 += item.quantity;
            entry.1 += 1;
            // RFC 3339 UTC times of one format order as strings do.
            if order.created_at > entry.2 {
                entry.2 = order.created_at.clone();
            }
        }
    }
    totals
}

/// Joins the totals with the products found.
pub fn join(mode: &str, user: User, totals: Totals, products: Vec<Product>) -> UserProducts {
    let mut by_id: BTreeMap<i64, Product> = products.into_iter().map(|p| (p.id, p)).collect();
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (id, (quantity, orders, last_ordered_at)) in totals {
        match by_id.remove(&id) {
            Some(product) => out.push(OrderedProduct {
                product,
                quantity,
                orders,
                last_ordered_at,
            }),
            None => missing.push(id),
        }
    }
    UserProducts {
        mode: mode.to_string(),
        user,
        products: out,
        missing_product_ids: missing,
    }
}

#[cfg(test)]
mod tests {
    use scenario_common::model::OrderItem;

    use super::*;

    #[test]
    fn totals_add_up_per_product() {
        let order = |id, at: &str, items: &[(i64, i64)]| Order {
            id,
            user_id: 1,
            created_at: at.into(),
            items: items
                .iter()
                .map(|&(product_id, quantity)| OrderItem {
                    product_id,
                    quantity,
                })
                .collect(),
        };
        let t = totals(&[
            order(1, "2025-01-01T00:00:00Z", &[(3, 2), (5, 1)]),
            order(2, "2025-02-01T00:00:00Z", &[(3, 1)]),
        ]);
        assert_eq!(t[&3], (3, 2, "2025-02-01T00:00:00Z".to_string()));
        assert_eq!(t[&5], (1, 1, "2025-01-01T00:00:00Z".to_string()));
    }
}
