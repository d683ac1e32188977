//! The subject tree: finds every subscription pattern that matches a topic without scanning all
//! subscriptions, as NATS's sublist does.
//!
//! Patterns are stored token by token. Matching a topic walks one level per token, following the
//! literal child, the `*` child and collecting the `>` entry at each level, so its cost grows with
//! the topic's length and the number of matching branches, not with the number of subscriptions.
//! The tree is generic over what it keeps at a pattern (`V`): the broker stores its subscribers
//! there. It holds no locks itself; the broker owns it behind its own lock.

use std::collections::HashMap;
use std::sync::Arc;

use crate::topic::{Pattern, PatternToken, Topic};

/// Values of type `V` indexed by subscription pattern.
#[derive(Debug)]
pub struct SubjectTree<V> {
    root: Level<V>,
}

#[derive(Debug)]
struct Level<V> {
    literal: HashMap<Arc<str>, Node<V>>,
    any: Option<Box<Node<V>>>,
    /// The value of the pattern that ends in `>` at this level.
    rest: Option<V>,
}

#[derive(Debug)]
struct Node<V> {
    /// The value of the pattern that ends at this token.
    leaf: Option<V>,
    next: Level<V>,
}

impl<V> Default for Level<V> {
    fn default() -> Self {
        Level {
            literal: HashMap::new(),
            any: None,
            rest: None,
        }
    }
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            leaf: None,
            next: Level::default(),
        }
    }
}

impl<V> Default for SubjectTree<V> {
    fn default() -> Self {
        SubjectTree {
            root: Level::default(),
        }
    }
}

impl<V> SubjectTree<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value stored at `pattern`, created with `V::default()` if absent.
    pub fn entry(&mut self, pattern: &Pattern) -> &mut V
    where
        V: Default,
    {
        let mut level = &mut self.root;
        let tokens = pattern.tokens();
        for (index, token) in tokens.iter().enumerate() {
            let last = index + 1 == tokens.len();
            let node = match token {
                PatternToken::Rest => return level.rest.get_or_insert_with(V::default),
                PatternToken::Any => &mut **level.any.get_or_insert_with(Box::default),
                PatternToken::Literal(literal) => level.literal.entry(literal.clone()).or_default(),
            };
            if last {
                return node.leaf.get_or_insert_with(V::default);
            }
            level = &mut node.next;
        }
        unreachable!("a parsed pattern has at least one token")
    }

    /// The value stored at `pattern`, if any.
    pub fn get_mut(&mut self, pattern: &Pattern) -> Option<&mut V> {
        let mut level = &mut self.root;
        let tokens = pattern.tokens();
        for (index, token) in tokens.iter().enumerate() {
            let node = match token {
                PatternToken::Rest => return level.rest.as_mut(),
                PatternToken::Any => level.any.as_deref_mut()?,
                PatternToken::Literal(literal) => level.literal.get_mut(&**literal)?,
            };
            if index + 1 == tokens.len() {
                return node.leaf.as_mut();
            }
            level = &mut node.next;
        }
        None
    }

    /// Removes the value at `pattern` if `is_empty` says so, and prunes the branches left empty,
    /// so the tree does not grow with patterns nobody uses any more.
    pub fn remove_if(&mut self, pattern: &Pattern, is_empty: impl Fn(&V) -> bool) {
        fn prune<V>(level: &mut Level<V>, tokens: &[PatternToken], is_empty: &dyn Fn(&V) -> bool) {
            let Some((token, rest)) = tokens.split_first() else {
                return;
            };
            let child = match token {
                PatternToken::Rest => {
                    if level.rest.as_ref().is_some_and(is_empty) {
                        level.rest = None;
                    }
                    return;
                }
                PatternToken::Any => level.any.as_deref_mut(),
                PatternToken::Literal(literal) => level.literal.get_mut(&**literal),
            };
            let Some(node) = child else { return };
            if rest.is_empty() {
                if node.leaf.as_ref().is_some_and(is_empty) {
                    node.leaf = None;
                }
            } else {
                prune(&mut node.next, rest, is_empty);
            }
            if node.leaf.is_none() && node.next.is_empty() {
                match token {
                    PatternToken::Any => level.any = None,
                    PatternToken::Literal(literal) => {
                        level.literal.remove(&**literal);
                    }
                    PatternToken::Rest => {}
                }
            }
        }
        prune(&mut self.root, pattern.tokens(), &is_empty);
    }

    /// Calls `visit` with the value of every pattern that matches `topic`. Each matching pattern
    /// is visited exactly once.
    pub fn for_each_match(&mut self, topic: &Topic, mut visit: impl FnMut(&mut V)) {
        walk(&mut self.root, topic.as_str(), &mut visit, None);
    }

    /// Like [`SubjectTree::for_each_match`], for a `visit` that may empty values: afterwards, a
    /// value that `is_empty` says is empty is removed and its branch pruned.
    pub fn for_each_match_and_prune(
        &mut self,
        topic: &Topic,
        mut visit: impl FnMut(&mut V),
        is_empty: impl Fn(&V) -> bool,
    ) {
        walk(&mut self.root, topic.as_str(), &mut visit, Some(&is_empty));
    }

    /// Whether the tree holds no values at all.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Calls `visit` with every pattern in the tree (as text) and its value, in no set order.
    /// For snapshots taken under a lock, so the work on them can happen outside it.
    pub fn for_each(&self, mut visit: impl FnMut(&str, &V)) {
        fn walk_all<V>(level: &Level<V>, prefix: &mut String, visit: &mut dyn FnMut(&str, &V)) {
            let start = prefix.len();
            let push = |prefix: &mut String, token: &str| {
                if !prefix.is_empty() {
                    prefix.push('.');
                }
                prefix.push_str(token);
            };
            if let Some(value) = &level.rest {
                push(prefix, ">");
                visit(prefix, value);
                prefix.truncate(start);
            }
            let children = level
                .literal
                .iter()
                .map(|(token, node)| (&**token, node))
                .chain(level.any.as_deref().map(|node| ("*", node)));
            for (token, node) in children {
                push(prefix, token);
                if let Some(value) = &node.leaf {
                    visit(prefix, value);
                }
                walk_all(&node.next, prefix, visit);
                prefix.truncate(start);
            }
        }
        walk_all(&self.root, &mut String::new(), &mut visit);
    }
}

impl<V> Level<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.any.is_none() && self.rest.is_none()
    }
}

type Visit<'a, V> = &'a mut dyn FnMut(&mut V);
type IsEmpty<'a, V> = Option<&'a dyn Fn(&V) -> bool>;

/// Matches `remaining` (the topic's tokens from here on) at `level`.
fn walk<V>(level: &mut Level<V>, remaining: &str, visit: Visit<'_, V>, prune: IsEmpty<'_, V>) {
    let (token, after) = match remaining.split_once('.') {
        Some((token, after)) => (token, Some(after)),
        None => (remaining, None),
    };
    if let Some(value) = level.rest.as_mut() {
        visit(value);
        if prune.is_some_and(|is_empty| is_empty(value)) {
            level.rest = None;
        }
    }
    if let Some(node) = level.literal.get_mut(token) {
        if step(node, after, visit, prune) {
            level.literal.remove(token);
        }
    }
    if let Some(node) = level.any.as_deref_mut() {
        if step(node, after, visit, prune) {
            level.any = None;
        }
    }
}

/// Matches past `node`; returns whether the node is left empty and should be pruned.
fn step<V>(
    node: &mut Node<V>,
    after: Option<&str>,
    visit: Visit<'_, V>,
    prune: IsEmpty<'_, V>,
) -> bool {
    match after {
        None => {
            if let Some(value) = node.leaf.as_mut() {
                visit(value);
                if prune.is_some_and(|is_empty| is_empty(value)) {
                    node.leaf = None;
                }
            }
        }
        Some(after) => walk(&mut node.next, after, visit, prune),
    }
    prune.is_some() && node.leaf.is_none() && node.next.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    fn matches(tree: &mut SubjectTree<Vec<String>>, topic: &str) -> Vec<String> {
        let mut found = Vec::new();
        tree.for_each_match(&Topic::parse(topic).unwrap(), |v| {
            found.extend(v.iter().cloned())
        });
        found.sort();
        found
    }

    #[test]
    fn finds_literal_and_wildcard_patterns() {
        let mut tree = SubjectTree::<Vec<String>>::new();
        for p in [
            "user.query",
            "user.*",
            "*.query",
            "user.>",
            ">",
            "order.query",
        ] {
            tree.entry(&pattern(p)).push(p.to_owned());
        }
        assert_eq!(
            matches(&mut tree, "user.query"),
            vec!["*.query", ">", "user.*", "user.>", "user.query"]
        );
        assert_eq!(matches(&mut tree, "user.query.x"), vec![">", "user.>"]);
        assert_eq!(matches(&mut tree, "user"), vec![">"]);
    }

    #[test]
    fn for_each_visits_every_pattern_with_its_text() {
        let mut tree = SubjectTree::<String>::new();
        let texts = ["user.query", "user.*", "*.query", "user.>", ">", "a.*.b.>"];
        for p in texts {
            *tree.entry(&pattern(p)) = p.to_owned();
        }
        let mut seen = Vec::new();
        tree.for_each(|text, value| {
            assert_eq!(text, value);
            seen.push(text.to_owned());
        });
        seen.sort();
        let mut expected: Vec<_> = texts.iter().map(|t| t.to_string()).collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn removal_prunes_empty_branches() {
        let mut tree = SubjectTree::<Vec<String>>::new();
        let p = pattern("a.b.c");
        tree.entry(&p).push("x".into());
        tree.entry(&pattern("a.>")).push("y".into());
        tree.get_mut(&p).unwrap().clear();
        tree.remove_if(&p, Vec::is_empty);
        assert_eq!(matches(&mut tree, "a.b.c"), vec!["y"]);
        tree.get_mut(&pattern("a.>")).unwrap().clear();
        tree.remove_if(&pattern("a.>"), Vec::is_empty);
        assert!(tree.is_empty());
    }

    #[test]
    fn matching_can_prune_values_it_emptied() {
        let mut tree = SubjectTree::<Vec<String>>::new();
        tree.entry(&pattern("a.*")).push("x".into());
        tree.entry(&pattern("a.>")).push("y".into());
        tree.entry(&pattern("a.b")).push("z".into());
        let topic = Topic::parse("a.b").unwrap();
        tree.for_each_match_and_prune(
            &topic,
            |v| v.retain(|s| s != "x" && s != "z"),
            Vec::is_empty,
        );
        assert_eq!(matches(&mut tree, "a.b"), vec!["y"]);
        tree.for_each_match_and_prune(&topic, Vec::clear, Vec::is_empty);
        assert!(tree.is_empty());
    }

    #[test]
    fn removal_keeps_values_that_are_not_empty() {
        let mut tree = SubjectTree::<Vec<String>>::new();
        let p = pattern("a.*");
        tree.entry(&p).push("x".into());
        tree.remove_if(&p, Vec::is_empty);
        assert_eq!(matches(&mut tree, "a.b"), vec!["x"]);
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_owned)
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(token(), 1..5).prop_map(|t| t.join("."))
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![token(), Just("*".to_owned())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, rest)| {
                if rest {
                    *tokens.last_mut().unwrap() = ">".to_owned();
                }
                tokens.join(".")
            })
    }

    proptest! {
        /// The tree finds exactly the patterns that direct matching finds.
        #[test]
        fn tree_agrees_with_direct_matching(
            patterns in prop::collection::vec(pattern_strategy(), 0..30),
            topics in prop::collection::vec(topic_strategy(), 1..20),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut tree = SubjectTree::<Vec<String>>::new();
            let mut live: Vec<String> = patterns.clone();
            for p in &patterns {
                tree.entry(&pattern(p)).push(p.clone());
            }
            for index in removed {
                if live.is_empty() { break; }
                let p = live.remove(index.index(live.len()));
                let parsed = pattern(&p);
                let values = tree.get_mut(&parsed).unwrap();
                let at = values.iter().position(|v| *v == p).unwrap();
                values.remove(at);
                tree.remove_if(&parsed, Vec::is_empty);
            }
            for t in &topics {
                let topic = Topic::parse(t).unwrap();
                let mut expected: Vec<String> = live
                    .iter()
                    .filter(|p| pattern(p).matches(&topic))
                    .cloned()
                    .collect();
                expected.sort();
                prop_assert_eq!(matches(&mut tree, t), expected, "topic {}", t);
            }
        }
    }
}
