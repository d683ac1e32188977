//! End-to-end tests of the scenario: the bus and the four services as real processes (built
//! binaries) on free ports, talking over the bus exactly as in the demo.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use eventbus::sdk::{Client, SubscribeOptions};
use scenario_common::fixtures;
use scenario_tests::{eventually, http, Scenario, STARTUP};
use serde_json::{json, Value};

/// What `GET /users/{id}/products` must answer for a seeded user, computed from the fixture
/// files here rather than by the services' code.
fn expected(user_id: i64) -> Value {
    let user = fixtures::users()
        .into_iter()
        .find(|u| u.id == user_id)
        .unwrap();
    let products: BTreeMap<i64, _> = fixtures::products()
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    let mut totals: BTreeMap<i64, (i64, i64, String)> = BTreeMap::new();
    for order in fixtures::orders().iter().filter(|o| o.user_id == user_id) {
        for item in &order.items {
            let t = totals.entry(item.product_id).or_default();
            t.0 += item.quantity;
            t.1 += 1;
            t.2 = t.2.clone().max(order.created_at.clone());
        }
    }
    json!({
        "user": user,
        "products": totals.into_iter().map(|(id, (quantity, orders, last))| json!({
            "product": products[&id],
            "quantity": quantity,
            "orders": orders,
            "last_ordered_at": last,
        })).collect::<Vec<_>>(),
        "missing_product_ids": [],
    })
}

fn without_mode(mut body: Value) -> Value {
    body.as_object_mut().unwrap().remove("mode");
    body
}

async fn status(port: u16) -> Value {
    http(port, "GET", "/status", None, &[])
        .await
        .unwrap()
        .json()
}

/// Waits until the projection holds `orders` orders and everything seeded.
async fn projection_has(port: u16, orders: i64) -> Value {
    eventually(STARTUP, "the projection to catch up", || async {
        let s = status(port).await;
        (s["users"] == 50 && s["products"] == 200 && s["orders"] == orders && s["lag"] == 0)
            .then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_users_match_the_fixture_in_both_modes() {
    let scenario = Scenario::start().await;
    let services = scenario.services().await;
    let rr = scenario
        .query_service("request-reply", "query-rr", &[])
        .await;
    let pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    projection_has(pr.port, 1000).await;

    for user_id in 1..=50 {
        let path = format!("/users/{user_id}/products");
        let a = http(rr.port, "GET", &path, None, &[]).await.unwrap();
        let b = http(pr.port, "GET", &path, None, &[]).await.unwrap();
        assert_eq!((a.status, b.status), (200, 200), "user {user_id}");
        let (a_body, b_body) = (a.json(), b.json());
        assert_eq!(a_body["mode"], "request-reply");
        assert_eq!(b_body["mode"], "projection");
        assert_eq!(a.header("x-query-mode"), Some("request-reply"));
        assert_eq!(b.header("x-query-mode"), Some("projection"));
        assert_eq!(
            without_mode(a_body.clone()),
            expected(user_id),
            "user {user_id}"
        );
        assert_eq!(without_mode(a_body), without_mode(b_body), "user {user_id}");
        let timing = a.header("server-timing").unwrap();
        for call in ["user;", "orders;", "products;"] {
            assert!(timing.contains(call), "{timing}");
        }
        assert!(b.header("x-projection-sequence").is_some());
    }

    for port in [rr.port, pr.port] {
        let unknown = http(port, "GET", "/users/999/products", None, &[])
            .await
            .unwrap();
        assert_eq!(unknown.status, 404);
        assert_eq!(unknown.json()["error"]["code"], "not_found");
    }

    // One request's correlation id is on the log lines of every service on its path.
    let id = "e2e-correlation-1";
    let answer = http(
        rr.port,
        "GET",
        "/users/7/products",
        None,
        &[("x-correlation-id", id)],
    )
    .await
    .unwrap();
    assert_eq!(answer.header("x-correlation-id"), Some(id));
    for proc in services.iter().chain([&rr.proc]) {
        proc.wait_for_log(id, 1).await;
    }

    // A caller that traces: its W3C trace context rides on each of the request's queries.
    let watcher = Client::builder(scenario.bus_url.clone())
        .source("trace-watcher")
        .connect()
        .await
        .unwrap();
    let mut queries = watcher.subscribe("*.query").await.unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = http(
        rr.port,
        "GET",
        "/users/7/products",
        None,
        &[("traceparent", traceparent), ("tracestate", "vendor=1")],
    )
    .await
    .unwrap();
    assert_eq!(traced.status, 200);
    let mut topics = Vec::new();
    while topics.len() < 3 {
        let event = tokio::time::timeout(STARTUP, queries.next_event())
            .await
            .expect("the request's queries")
            .unwrap()
            .unwrap();
        assert_eq!(
            eventbus::sdk::traceparent(&event),
            Some(traceparent),
            "{}",
            event.topic
        );
        assert_eq!(event.attributes["tracestate"], "vendor=1");
        topics.push(event.topic);
    }
    topics.sort();
    assert_eq!(topics, ["order.query", "product.query", "user.query"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_user_service_fails_request_reply_at_once_and_projection_still_answers() {
    let scenario = Scenario::start().await;
    let [mut user, _product, _order] = scenario.services().await;
    let timeout = Duration::from_secs(3);
    let rr = scenario
        .query_service("request-reply", "query-rr", &["--user-timeout", "3s"])
        .await;
    let pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    projection_has(pr.port, 1000).await;

    user.terminate();
    eventually(STARTUP, "user.query to lose its subscriber", || async {
        (scenario.subscribers("user.query").await == 0).then_some(())
    })
    .await;

    let started = Instant::now();
    let answer = http(rr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 503, "{:?}", answer.json());
    let body = answer.json();
    assert_eq!(body["mode"], "request-reply");
    assert_eq!(body["error"]["service"], "user-service");
    assert!(
        elapsed < timeout / 3,
        "503 took {elapsed:?}, the timeout is {timeout:?}"
    );

    let answer = http(pr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(without_mode(answer.json()), expected(7));

    // A user-service that is subscribed but never answers: 504 naming it, after the timeout.
    let _silent = scenario
        .client
        .subscribe_with("user.query", SubscribeOptions::new().group("user-service"))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = http(rr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["error"]["service"], "user-service");
    assert!(started.elapsed() >= timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_order_appears_in_the_projection() {
    let scenario = Scenario::start().await;
    let _services = scenario.services().await;
    let pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    projection_has(pr.port, 1000).await;
    let before = http(pr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    let sequence_before: u64 = before
        .header("x-projection-sequence")
        .unwrap()
        .parse()
        .unwrap();
    let quantity = |body: &Value, product: i64| {
        body["products"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["product"]["id"] == product)
            .map_or(0, |p| p["quantity"].as_i64().unwrap())
    };
    let had = quantity(&before.json(), 3);

    let created = http(
        pr.port,
        "POST",
        "/users/7/orders",
        Some(r#"{"items": [{"product_id": 3, "quantity": 2}]}"#),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(created.status, 201, "{:?}", created.json());
    let order = created.json()["order"].clone();
    assert_eq!(order["id"], 1001);
    assert_eq!(order["user_id"], 7);

    let after = eventually(STARTUP, "the order in the projection", || async {
        let r = http(pr.port, "GET", "/users/7/products", None, &[])
            .await
            .unwrap();
        // The header follows the applied data a moment later (it is read from the projection's
        // progress counter, updated right after the transaction commits).
        let sequence: u64 = r.header("x-projection-sequence")?.parse().ok()?;
        (quantity(&r.json(), 3) == had + 2 && sequence > sequence_before).then_some(r)
    })
    .await;
    let sequence_after: u64 = after
        .header("x-projection-sequence")
        .unwrap()
        .parse()
        .unwrap();
    assert!(sequence_after > sequence_before);
    projection_has(pr.port, 1001).await;

    // Commands are validated through the other services.
    let bad = |path: &'static str, body: &'static str| async move {
        http(pr.port, "POST", path, Some(body), &[]).await.unwrap()
    };
    let r = bad(
        "/users/999/orders",
        r#"{"items": [{"product_id": 3, "quantity": 1}]}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let r = bad(
        "/users/7/orders",
        r#"{"items": [{"product_id": 9999, "quantity": 1}]}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid"))
    );
    let r = bad(
        "/users/7/orders",
        r#"{"items": [{"product_id": 3, "quantity": 0}]}"#,
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_product_service_replicas_answer_each_query_exactly_once() {
    let scenario = Scenario::start().await;
    let shared_db = scenario.db("product-service");
    let one = scenario
        .service("product-service", "product-1", &["--db", &shared_db])
        .await;
    let two = scenario
        .service("product-service", "product-2", &["--db", &shared_db])
        .await;
    assert_eq!(scenario.subscribers("product.query").await, 2);
    // The second replica found the database seeded and its outbox empty.
    assert!(two.log().contains("seeded=None"));
    assert_eq!(scenario.published("product.created").await, 200);

    // Queries with our own reply topic, so every reply can be counted.
    let mut replies = scenario.client.subscribe("test.replies").await.unwrap();
    let queries = 40;
    for i in 0..queries {
        scenario
            .client
            .event("product.query")
            .json(&json!({"product_ids": [1, 2, i + 1]}))
            .unwrap()
            .reply_to("test.replies")
            .correlation_id(format!("q-{i}"))
            .publish()
            .await
            .unwrap();
    }
    let mut per_query: HashMap<String, usize> = HashMap::new();
    tokio::time::timeout(STARTUP, async {
        while per_query.len() < queries as usize {
            let event = replies.next_event().await.unwrap().unwrap();
            *per_query.entry(event.correlation_id).or_default() += 1;
        }
    })
    .await
    .expect("every query answered");
    let answered = |p: &scenario_tests::Proc| p.log().matches("answered").count();
    eventually(STARTUP, "both replicas' logs", || async {
        (answered(&one) + answered(&two) >= queries as usize).then_some(())
    })
    .await;
    assert_eq!(answered(&one) + answered(&two), queries as usize);
    assert!(per_query.values().all(|&n| n == 1), "{per_query:?}");
    assert!(
        answered(&one) > 0 && answered(&two) > 0,
        "the replicas split the work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_does_not_publish_its_seed_again() {
    let scenario = Scenario::start().await;
    let counts = [
        ("user-service", "user.created", 50),
        ("product-service", "product.created", 200),
        ("order-service", "order.created", 1000),
    ];
    let mut services = scenario.services().await;
    for (_, topic, count) in counts {
        assert_eq!(scenario.published(topic).await, count, "{topic}");
    }
    for proc in &mut services {
        assert!(proc.terminate().success(), "{} exits cleanly", proc.name);
    }
    for (service, _, _) in counts {
        let again = scenario
            .service(
                service,
                &format!("{service}-again"),
                &["--db", &scenario.db(service)],
            )
            .await;
        assert!(again.log().contains("seeded=None"), "{}", again.log());
        assert!(
            again.log().contains("outbox drained published=0"),
            "{}",
            again.log()
        );
    }
    for (_, topic, count) in counts {
        assert_eq!(scenario.published(topic).await, count, "{topic}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projection_resumes_after_a_restart_without_reapplying_or_skipping() {
    let scenario = Scenario::start().await;
    let _services = scenario.services().await;
    let mut pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    let first = projection_has(pr.port, 1000).await;
    let last = first["last_applied_sequence"].as_u64().unwrap();
    let applied = first["events_applied"].as_u64().unwrap();
    assert_eq!(applied, 1250);
    assert!(pr.proc.terminate().success());

    // Changes while the projection is away.
    let creator = Client::builder(scenario.bus_url.clone())
        .source("scenario-test")
        .connect()
        .await
        .unwrap();
    for product in [5, 6, 7] {
        creator
            .event("order.create")
            .json(&json!({"user_id": 9, "items": [{"product_id": product, "quantity": 1}]}))
            .unwrap()
            .query(Duration::from_secs(5))
            .await
            .unwrap();
    }

    let again = scenario
        .query_service(
            "projection",
            "query-projection-again",
            &["--db", &scenario.db("query-projection")],
        )
        .await;
    let status = projection_has(again.port, 1003).await;
    assert_eq!(status["resumed_after"].as_u64(), Some(last));
    assert_eq!(status["applied_since_start"], 3, "{status}");
    assert_eq!(status["events_applied"].as_u64(), Some(applied + 3));
    assert!(status["last_applied_sequence"].as_u64().unwrap() > last);
    again.proc.wait_for_log(&format!("after={last}"), 1).await;
}

/// The scenario on a clustered bus (two bus nodes on one JetStream stream), with the node the
/// query, product and order services use killed (SIGKILL) mid-test: the projection keeps
/// answering throughout, and request-reply answers again once the services have moved to the
/// other node, within `RECOVERY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_scenario_survives_a_bus_node_killed_mid_test() {
    const RECOVERY: Duration = Duration::from_secs(15);
    let mut scenario = Scenario::start_cluster().await;
    let _services = scenario.services().await;
    let rr = scenario
        .query_service("request-reply", "query-rr", &[])
        .await;
    let pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    projection_has(pr.port, 1000).await;
    let answer = http(rr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    assert_eq!(without_mode(answer.json()), expected(7));

    scenario.bus.kill();
    let killed = Instant::now();
    let answer = http(pr.port, "GET", "/users/7/products", None, &[])
        .await
        .unwrap();
    assert_eq!(
        answer.status, 200,
        "the projection answers from its own data"
    );
    assert_eq!(without_mode(answer.json()), expected(7));

    let answer = eventually(RECOVERY, "request-reply to answer again", || async {
        http(rr.port, "GET", "/users/7/products", None, &[])
            .await
            .ok()
            .filter(|answer| answer.status == 200)
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(without_mode(answer.json()), expected(7));
    eprintln!("request-reply answered again {took:?} after a bus node was killed");
}
