//! Topic names and subscription patterns: their syntax, checked once at the edge, so the rest of
//! the bus works on values that are known to be valid.
//!
//! A topic is dot-separated tokens, each `[A-Za-z0-9_-]+`, 1 to 255 bytes in all. A pattern is a
//! topic where a token may be `*` (exactly one token) and the last token may be `>` (one or more
//! trailing tokens), as NATS subjects do. Topics under `_bus.` belong to the bus.

use std::fmt;
use std::sync::Arc;

/// The longest topic or pattern, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;

/// The prefix of every topic the bus owns.
pub const RESERVED_PREFIX: &str = "_bus.";

/// The prefix of reply inboxes: `_bus.inbox.<id>`. Clients may publish there (to answer a query).
pub const INBOX_PREFIX: &str = "_bus.inbox.";

/// The name under which all reply inboxes are counted in topic lists and the topology: one entry
/// rather than one per query.
pub const INBOX_FAMILY: &str = "_bus.inbox.*";

/// Why a topic or pattern was refused. The message names the rule; the caller adds the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes, the limit is {MAX_TOPIC_BYTES}")]
    TooLong { len: usize },
    #[error("has an empty token at position {position} (tokens are separated by single dots)")]
    EmptyToken { position: usize },
    #[error("token {token:?} has a character outside [A-Za-z0-9_-]")]
    BadCharacter { token: String },
    #[error("wildcard {token:?} is not allowed in a topic (only in subscription patterns)")]
    WildcardInTopic { token: String },
    #[error("'>' may only be the last token")]
    FullWildcardNotLast,
    #[error(
        "topics under '_bus.' belong to the bus; clients may publish only to '_bus.inbox.<id>'"
    )]
    Reserved,
}

/// A valid topic name, cheap to clone (shared between the store and every delivery).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Parses a concrete topic (no wildcards). Reserved topics are accepted here; the publish
    /// path decides who may use them (see [`Topic::is_publishable_by_clients`]).
    pub fn parse(name: &str) -> Result<Topic, TopicError> {
        check_tokens(name, false)?;
        Ok(Topic(Arc::from(name)))
    }

    /// Parses a topic and refuses reserved ones other than reply inboxes.
    pub fn parse_client_publishable(name: &str) -> Result<Topic, TopicError> {
        let topic = Topic::parse(name)?;
        if topic.is_publishable_by_clients() {
            Ok(topic)
        } else {
            Err(TopicError::Reserved)
        }
    }

    /// Client events may go anywhere but `_bus.`, except reply inboxes.
    pub fn is_publishable_by_clients(&self) -> bool {
        !self.0.starts_with(RESERVED_PREFIX) || self.is_inbox()
    }

    /// Whether this is a reply inbox (`_bus.inbox.<id>`).
    pub fn is_inbox(&self) -> bool {
        self.0.starts_with(INBOX_PREFIX)
    }

    /// The name to count this topic under in lists and the topology: inboxes fold into one.
    pub fn family(&self) -> &str {
        if self.is_inbox() {
            INBOX_FAMILY
        } else {
            &self.0
        }
    }

    /// A fresh, unguessable reply inbox: 122 random bits (a version 4 UUID), so no one who
    /// was not shown the query can aim a reply at it (a time-ordered UUID would give away 48
    /// of its bits). With authentication on, a reply is also checked against the waiting query
    /// ([`crate::auth`]).
    pub fn new_inbox() -> Topic {
        Topic(Arc::from(format!(
            "{INBOX_PREFIX}{}",
            uuid::Uuid::new_v4().simple()
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic's tokens, in order.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One token of a subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternToken {
    /// Matches exactly this token.
    Literal(Arc<str>),
    /// `*`: matches any one token.
    Any,
    /// `>`: matches one or more trailing tokens (last place only).
    Rest,
}

/// A valid subscription pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Arc<str>,
    tokens: Arc<[PatternToken]>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, TopicError> {
        check_tokens(text, true)?;
        let tokens = text
            .split('.')
            .map(|token| match token {
                "*" => PatternToken::Any,
                ">" => PatternToken::Rest,
                literal => PatternToken::Literal(Arc::from(literal)),
            })
            .collect();
        Ok(Pattern {
            text: Arc::from(text),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> &[PatternToken] {
        &self.tokens
    }

    /// Whether the pattern has no wildcard, i.e. names exactly one topic.
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|t| matches!(t, PatternToken::Literal(_)))
    }

    /// Direct matching of one topic, token by token. The bus routes through the subject tree
    /// ([`crate::sublist`]); this is for filters (topic lists, replays) and as the reference the
    /// tree is tested against.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut topic_tokens = topic.tokens();
        for token in self.tokens.iter() {
            match token {
                PatternToken::Rest => return topic_tokens.next().is_some(),
                PatternToken::Any => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                PatternToken::Literal(literal) => {
                    if topic_tokens.next() != Some(&**literal) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }
}

impl Pattern {
    /// Whether every topic `other` matches, this pattern matches too: `orders.>` covers
    /// `orders.*.created` and `orders.eu`, `*.created` covers `order.created` but not
    /// `order.>`. Permissions use it to decide whether a subscription stays inside what a
    /// principal may read.
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.tokens.iter();
        for mine in self.tokens.iter() {
            let Some(their) = theirs.next() else {
                // `other` is shorter: its topics lack the tokens this pattern still needs.
                return false;
            };
            match (mine, their) {
                (PatternToken::Rest, _) => return true,
                (_, PatternToken::Rest) => return false,
                (PatternToken::Any, _) => {}
                (PatternToken::Literal(_), PatternToken::Any) => return false,
                (PatternToken::Literal(a), PatternToken::Literal(b)) => {
                    if a != b {
                        return false;
                    }
                }
            }
        }
        theirs.next().is_none()
    }

    /// Whether some topic matches both patterns: `orders.*` and `*.created` share
    /// `orders.created`; `orders.>` and `users.>` share none.
    pub fn intersects(&self, other: &Pattern) -> bool {
        let mut theirs = other.tokens.iter();
        for mine in self.tokens.iter() {
            let Some(their) = theirs.next() else {
                return false;
            };
            match (mine, their) {
                (PatternToken::Rest, _) | (_, PatternToken::Rest) => return true,
                (PatternToken::Literal(a), PatternToken::Literal(b)) if a != b => return false,
                _ => {}
            }
        }
        theirs.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

fn check_tokens(text: &str, wildcards_allowed: bool) -> Result<(), TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    if text.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong { len: text.len() });
    }
    let token_count = text.split('.').count();
    for (position, token) in text.split('.').enumerate() {
        if token.is_empty() {
            return Err(TopicError::EmptyToken { position });
        }
        if token == "*" || token == ">" {
            if !wildcards_allowed {
                return Err(TopicError::WildcardInTopic {
                    token: token.to_owned(),
                });
            }
            if token == ">" && position + 1 != token_count {
                return Err(TopicError::FullWildcardNotLast);
            }
            continue;
        }
        if !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(TopicError::BadCharacter {
                token: token.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    fn arb_pattern() -> impl Strategy<Value = Pattern> {
        proptest::collection::vec(prop_oneof!["a", "b", Just("*".to_owned())], 1..4).prop_flat_map(
            |tokens| {
                (Just(tokens), any::<bool>()).prop_map(|(mut tokens, rest)| {
                    if rest {
                        tokens.push(">".to_owned());
                    }
                    Pattern::parse(&tokens.join(".")).unwrap()
                })
            },
        )
    }

    /// Every topic of up to 5 tokens over the alphabet the patterns use (plus one they don't).
    fn all_topics() -> Vec<Topic> {
        let mut topics = vec![];
        let mut current: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..5 {
            let mut next = vec![];
            for prefix in &current {
                for token in ["a", "b", "c"] {
                    let mut t = prefix.clone();
                    t.push(token);
                    topics.push(Topic::parse(&t.join(".")).unwrap());
                    next.push(t);
                }
            }
            current = next;
        }
        topics
    }

    proptest! {
        /// `covers` and `intersects` agree with matching every topic of the alphabet (`>`
        /// stands for up to 5 tokens here, enough for patterns of at most 4).
        #[test]
        fn covers_and_intersects_agree_with_matching(a in arb_pattern(), b in arb_pattern()) {
            let topics = all_topics();
            let covered = topics.iter().all(|t| !b.matches(t) || a.matches(t));
            let shared = topics.iter().any(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(a.covers(&b), covered, "{} covers {}", a, b);
            prop_assert_eq!(a.intersects(&b), shared, "{} intersects {}", a, b);
        }
    }

    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::parse(name).unwrap()
    }

    #[test]
    fn accepts_valid_topics() {
        for name in ["a", "user.query", "A-b_c.9", "_bus.inbox.x1"] {
            assert!(Topic::parse(name).is_ok(), "{name}");
        }
        assert!(Topic::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_invalid_topics_with_the_rule() {
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(
            Topic::parse(&"a".repeat(256)),
            Err(TopicError::TooLong { len: 256 })
        );
        assert_eq!(
            Topic::parse("a..b"),
            Err(TopicError::EmptyToken { position: 1 })
        );
        assert_eq!(
            Topic::parse("a."),
            Err(TopicError::EmptyToken { position: 1 })
        );
        assert!(matches!(
            Topic::parse("a b"),
            Err(TopicError::BadCharacter { .. })
        ));
        assert!(matches!(
            Topic::parse("a.*"),
            Err(TopicError::WildcardInTopic { .. })
        ));
        assert!(matches!(
            Topic::parse("a.>"),
            Err(TopicError::WildcardInTopic { .. })
        ));
        assert!(matches!(
            Topic::parse("ü"),
            Err(TopicError::BadCharacter { .. })
        ));
    }

    #[test]
    fn reserved_topics_are_publishable_only_as_inboxes() {
        assert_eq!(
            Topic::parse_client_publishable("_bus.dlq.g"),
            Err(TopicError::Reserved)
        );
        assert!(Topic::parse_client_publishable("_bus.inbox.abc").is_ok());
        assert!(Topic::parse_client_publishable("_busy.x").is_ok());
        assert!(Topic::new_inbox().is_inbox());
        assert_eq!(topic("_bus.inbox.abc").family(), INBOX_FAMILY);
        assert_eq!(topic("user.query").family(), "user.query");
    }

    #[test]
    fn refuses_invalid_patterns() {
        assert_eq!(
            Pattern::parse("a.>.b"),
            Err(TopicError::FullWildcardNotLast)
        );
        assert!(matches!(
            Pattern::parse("a.b*"),
            Err(TopicError::BadCharacter { .. })
        ));
        assert_eq!(Pattern::parse(""), Err(TopicError::Empty));
    }

    #[test]
    fn matches_like_nats_subjects() {
        let cases = [
            ("user.query", "user.query", true),
            ("user.query", "user.queries", false),
            ("user.*", "user.query", true),
            ("user.*", "user.query.x", false),
            ("user.*", "user", false),
            ("*.query", "order.query", true),
            ("user.>", "user.query", true),
            ("user.>", "user.query.deep", true),
            ("user.>", "user", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
            ("a.*.c.>", "a.b.c.d.e", true),
            ("a.*.c.>", "a.b.c", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                Pattern::parse(pattern).unwrap().matches(&topic(name)),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn literal_patterns_are_recognised() {
        assert!(Pattern::parse("a.b").unwrap().is_literal());
        assert!(!Pattern::parse("a.*").unwrap().is_literal());
        assert!(!Pattern::parse("a.>").unwrap().is_literal());
    }
}
