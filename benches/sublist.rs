//! Matching a topic against 10,000 subscriptions in the subject tree: the cost the broker pays
//! for every published event, under its routing lock.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use eventbus::sublist::SubjectTree;
use eventbus::topic::{Pattern, Topic};

/// 10,000 patterns the way services subscribe: mostly literal topics spread over 100 services
/// and 90 entities, plus `*` and `>` wildcards per service.
fn tree() -> SubjectTree<u64> {
    let mut tree = SubjectTree::new();
    let mut patterns = Vec::new();
    for service in 0..100 {
        for entity in 0..90 {
            patterns.push(format!("svc{service}.entity{entity}.created"));
        }
        for kind in 0..5 {
            patterns.push(format!("svc{service}.*.kind{kind}"));
            patterns.push(format!("svc{service}.entity{kind}.>"));
        }
    }
    assert_eq!(patterns.len(), 10_000);
    for (index, pattern) in patterns.iter().enumerate() {
        *tree.entry(&Pattern::parse(pattern).expect("a valid pattern")) += index as u64;
    }
    tree
}

fn bench(c: &mut Criterion) {
    let mut tree = tree();
    let mut group = c.benchmark_group("sublist/10k subscriptions");
    for (name, topic) in [
        ("one literal match", "svc42.entity17.created"),
        ("literal and wildcard matches", "svc42.entity3.created"),
        ("no match", "svc42.entity17.deleted"),
        ("unknown first token", "billing.invoice.paid"),
    ] {
        let topic = Topic::parse(topic).expect("a valid topic");
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sum = 0u64;
                tree.for_each_match(black_box(&topic), |value| sum += *value);
                black_box(sum)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
