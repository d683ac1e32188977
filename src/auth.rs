//! Who a caller is and what it may do: principals from bearer tokens or client certificates,
//! NATS-style publish and subscribe permissions, group and admin rights, the sources a
//! principal may publish as, and an audit line for every refusal.
//!
//! # Where the rules come from
//! The config file's `[[principals]]` (the shape is a contract, see SECURITY.md):
//!
//! ```toml
//! [[principals]]
//! name = "user-service"
//! token_hash = "$argon2id$..."  # `eventbus hash-token`; or cert_subject = "CN=user-service"
//! publish = ["user.>"]          # allow lists of patterns; publish_deny / subscribe_deny too
//! subscribe = ["user.query"]
//! groups = ["user-service"]     # groups it may join; omitted = any
//! admin = false                 # AdminService
//! sources = ["user-service"]    # what `source` its events may carry; omitted = [name]
//! ```
//!
//! With no `[[principals]]` the bus is open, as before: every call is allowed and the server
//! says so at start-up. With any, every call to `eventbus.v1` must authenticate; gRPC health
//! and reflection stay open (load balancers and grpcurl need them, and they show no events).
//!
//! # Authentication
//! [`AuthLayer`] runs before every `eventbus.v1` call: `authorization: Bearer <token>` is
//! checked against the principals' argon2 hashes (only hashes are configured), or, without a
//! token, the connection's verified client certificate: its subject against `cert_subject`, or
//! one of its subject alternative names against `cert_san`. A token
//! is verified with argon2 once: the result is kept under the token's SHA-256 until the next
//! reload, so a client pays the hash once per process, and at most [`VERIFYING_AT_ONCE`]
//! verifications run at once so a flood of wrong tokens cannot take every core.
//!
//! # Permissions (as NATS writes them)
//! - Publish: a topic is allowed when an allow pattern matches it and no deny pattern does (deny
//!   wins). An omitted allow list allows nothing.
//! - Subscribe: the pattern must lie inside an allow pattern ([`Pattern::covers`]) and not inside
//!   a deny pattern; where a deny pattern only overlaps it (`orders.>` with `orders.secret`), the
//!   subscription is allowed and events of denied topics are not delivered to it, as NATS does.
//! - Reserved topics (`_bus.`): a query's inbox belongs to the principal that asked. No
//!   client subscribes to an inbox (the asker gets its answer on the Query call), so
//!   subscriptions never receive inbox events. A reply may be published only into an inbox a
//!   query waits on, and only by a principal allowed to subscribe to the query's topic: the
//!   node that holds the query knows its topic, and on a cluster the others ask it over NATS
//!   (each node answers `_EVENTBUS.<stream>.inboxes.<inbox>` for the queries it holds). Dead-letter topics (`_bus.dlq.<group>`) can be
//!   subscribed to only with an allow pattern that names `_bus` itself (`>` does not grant them).
//! - Groups: `groups` lists the groups a principal may join, ack and nack in; omitted, any.
//! - `admin` grants AdminService (ListTopics, GetTopology, ListGroups, GetServerInfo).
//! - Sources: an event's `source` must be one of the principal's `sources` (by default its
//!   name), so a service cannot publish as another; an empty `source` is filled with the first.
//!
//! A breach answers PERMISSION_DENIED naming the principal, the action and the topic, and
//! nothing of the call is applied (a batch with one denied event stores none).
//!
//! # Reload
//! [`Auth::reload`] swaps the whole policy at once (SIGHUP or a change of the config file, see
//! [`crate::server`]); a bad file is refused as a whole and the old policy kept. Open
//! subscriptions are checked again against the new policy at their next delivery and ended
//! (PERMISSION_DENIED, or UNAUTHENTICATED if their principal is gone) if it no longer allows
//! them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use futures_util::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::codegen::http;

use crate::accept::ConnectionInfo;
use crate::config::ConfigError;
use crate::error::BusError;
use crate::event::Event;
use crate::limits::{Limits, LimitsConfig, Scope, Slot, Usage};
use crate::metrics::Metrics;
use crate::topic::{Pattern, PatternToken, Topic, INBOX_PREFIX, RESERVED_PREFIX};

/// argon2 verifications running at once, at most: each takes tens of milliseconds of a core.
pub const VERIFYING_AT_ONCE: usize = 2;

/// Wrong tokens remembered as wrong, at most; past it that memory starts over. Tokens that
/// matched a principal are remembered apart (at most one per token a principal has, in
/// practice), so a flood of wrong tokens never pushes a known-good one out.
pub const MAX_REMEMBERED_TOKENS: usize = 4096;

/// Verifications of tokens not seen before that one remote address may start per second
/// (with a burst of [`NEW_TOKENS_PER_ADDRESS_BURST`]): a client pays one per token and
/// process, so only a guesser or a flood runs into it. Past it: UNAUTHENTICATED at once, without an argon2 check, so one address
/// cannot keep the [`VERIFYING_AT_ONCE`] verifiers busy for everyone else.
pub const NEW_TOKENS_PER_ADDRESS_PER_SECOND: u32 = 10;

/// The burst of [`NEW_TOKENS_PER_ADDRESS_PER_SECOND`]: services behind one address (a NAT, a
/// node) starting together.
pub const NEW_TOKENS_PER_ADDRESS_BURST: u32 = 50;

/// Remote addresses the new-token limiter tracks before it forgets the idle ones.
const NEW_TOKEN_ADDRESSES: usize = 10_000;

/// Audit lines written per second, at most (with a burst of as many); the lines left out are
/// counted in the next one's `suppressed`.
pub const AUDIT_LINES_PER_SECOND: u32 = 20;

/// One `[[principals]]` entry as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Names the principal in audit lines, metrics-free logs and errors; unique.
    pub name: String,
    /// The PHC string of an argon2 hash of its bearer token (`eventbus hash-token`).
    #[serde(default)]
    pub token_hash: Option<String>,
    /// The subject of its mutual-TLS client certificate, RFC 4514 (`CN=order-service,O=Acme`).
    #[serde(default)]
    pub cert_subject: Option<String>,
    /// A subject alternative name (DNS name or URI, e.g. `spiffe://acme/order-service`) of its
    /// mutual-TLS client certificate: for certificates that identify by SAN, as SPIFFE's do.
    #[serde(default)]
    pub cert_san: Option<String>,
    /// Topic patterns it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns it may not publish to, whatever `publish` allows.
    #[serde(default)]
    pub publish_deny: Vec<String>,
    /// Topic patterns it may subscribe to (and Query replies need: see the module docs).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topic patterns it may not receive, whatever `subscribe` allows.
    #[serde(default)]
    pub subscribe_deny: Vec<String>,
    /// Groups it may join; `None`: any.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// Whether it may call AdminService.
    #[serde(default)]
    pub admin: bool,
    /// The `source` values its events may carry; `None`: its name alone. `"*"`: any.
    #[serde(default)]
    pub sources: Option<Vec<String>>,
    /// Its own limits, over `[limits.principal]`, key by key.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// The part of the config file a reload applies: principals and limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub principals: Vec<PrincipalConfig>,
    pub limits: LimitsConfig,
}

/// Allow and deny patterns for one action.
#[derive(Debug, Clone, Default)]
struct Permission {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl Permission {
    /// Whether `topic` may be published to, or delivered: an allow pattern matches and no deny
    /// pattern does. A reserved topic (`_bus.`) needs an allow pattern naming `_bus` itself.
    fn allows_topic(&self, topic: &Topic) -> bool {
        let reserved = topic.as_str().starts_with(RESERVED_PREFIX);
        !self.deny.iter().any(|p| p.matches(topic))
            && self
                .allow
                .iter()
                .any(|p| p.matches(topic) && (!reserved || names_reserved(p)))
    }
}

/// Whether a pattern's first token is literally `_bus`, as granting reserved topics requires.
fn names_reserved(pattern: &Pattern) -> bool {
    matches!(pattern.tokens().first(), Some(PatternToken::Literal(t)) if &**t == "_bus")
}

/// A principal as the bus checks it: its config, compiled.
#[derive(Debug)]
pub struct Principal {
    name: Arc<str>,
    token_hash: Option<String>,
    cert_subject: Option<String>,
    cert_san: Option<String>,
    publish: Permission,
    subscribe: Permission,
    groups: Option<HashSet<String>>,
    admin: bool,
    /// Empty: any source.
    sources: Vec<String>,
    limits: Limits,
}

impl Principal {
    /// Its configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The source an event of its gets when it names none.
    fn default_source(&self) -> &str {
        self.sources.first().map_or(&*self.name, String::as_str)
    }
}

/// Every principal and the limits, compiled from one [`AuthConfig`]; swapped whole on reload.
#[derive(Debug, Default)]
struct Policy {
    /// Counts reloads; subscriptions notice a new policy by it.
    generation: u64,
    principals: Vec<Arc<Principal>>,
    by_name: HashMap<Arc<str>, Arc<Principal>>,
    by_subject: HashMap<String, Arc<Principal>>,
    by_san: HashMap<String, Arc<Principal>>,
    limits: LimitsConfig,
}

impl Policy {
    /// The principal a client certificate is: by its subject first, else by the first
    /// alternative name a principal names.
    fn by_certificate(&self, subject: &str, sans: &[String]) -> Option<Arc<Principal>> {
        self.by_subject
            .get(subject)
            .or_else(|| sans.iter().find_map(|san| self.by_san.get(san)))
            .cloned()
    }

    fn compile(config: &AuthConfig, generation: u64) -> Result<Policy, ConfigError> {
        let mut policy = Policy {
            generation,
            limits: config.limits,
            ..Policy::default()
        };
        for (index, entry) in config.principals.iter().enumerate() {
            let invalid = |rule: String| ConfigError::Invalid {
                setting: "principals",
                rule: format!("[{index}] (name {:?}): {rule}", entry.name),
            };
            if entry.name.trim().is_empty() {
                return Err(invalid("name must not be empty".into()));
            }
            if policy.by_name.contains_key(&*entry.name) {
                return Err(invalid("name is already used by another principal".into()));
            }
            if entry.token_hash.is_none()
                && entry.cert_subject.is_none()
                && entry.cert_san.is_none()
            {
                return Err(invalid(
                    "needs token_hash (from `eventbus hash-token`), cert_subject or cert_san"
                        .into(),
                ));
            }
            if let Some(hash) = &entry.token_hash {
                let parsed = PasswordHash::new(hash).map_err(|error| {
                    invalid(format!(
                        "token_hash is not a PHC hash string ({error}); make one with \
                         `eventbus hash-token`"
                    ))
                })?;
                if !parsed.algorithm.as_str().starts_with("argon2") {
                    return Err(invalid(format!(
                        "token_hash uses {}, only argon2 hashes are accepted",
                        parsed.algorithm
                    )));
                }
            }
            let patterns = |key: &str, list: &[String]| {
                list.iter()
                    .enumerate()
                    .map(|(i, text)| {
                        Pattern::parse(text).map_err(|error| {
                            invalid(format!(
                                "{key}[{i}] {text:?} is not a topic pattern: {error}"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let sources = match &entry.sources {
                None => vec![entry.name.clone()],
                Some(list) if list.iter().any(|s| s == "*") => vec![],
                Some(list) if list.is_empty() || list.iter().any(|s| s.is_empty()) => {
                    return Err(invalid(
                        "sources must list non-empty names (or \"*\" for any)".into(),
                    ))
                }
                Some(list) => list.clone(),
            };
            let principal = Arc::new(Principal {
                name: Arc::from(entry.name.as_str()),
                token_hash: entry.token_hash.clone(),
                cert_subject: entry.cert_subject.as_deref().map(normalize_subject),
                cert_san: entry.cert_san.clone(),
                publish: Permission {
                    allow: patterns("publish", &entry.publish)?,
                    deny: patterns("publish_deny", &entry.publish_deny)?,
                },
                subscribe: Permission {
                    allow: patterns("subscribe", &entry.subscribe)?,
                    deny: patterns("subscribe_deny", &entry.subscribe_deny)?,
                },
                groups: entry
                    .groups
                    .as_ref()
                    .map(|groups| groups.iter().cloned().collect()),
                admin: entry.admin,
                sources,
                limits: config
                    .limits
                    .principal
                    .overridden_by(&entry.limits.unwrap_or_default()),
            });
            if let Some(san) = &principal.cert_san {
                if policy
                    .by_san
                    .insert(san.clone(), principal.clone())
                    .is_some()
                {
                    return Err(invalid(format!(
                        "cert_san {san:?} is already another principal's"
                    )));
                }
            }
            if let Some(subject) = &principal.cert_subject {
                if policy
                    .by_subject
                    .insert(subject.clone(), principal.clone())
                    .is_some()
                {
                    return Err(invalid(format!(
                        "cert_subject {subject:?} is already another principal's"
                    )));
                }
            }
            policy
                .by_name
                .insert(principal.name.clone(), principal.clone());
            policy.principals.push(principal);
        }
        Ok(policy)
    }
}

/// Subjects compare without the spaces people put after commas (`CN=a, O=b` is `CN=a,O=b`).
fn normalize_subject(subject: &str) -> String {
    subject
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",")
}

/// Who is calling: put in every `eventbus.v1` request's extensions by [`AuthLayer`].
///
/// A caller held by a long-lived stream (a PublishStream, a subscription's delivery filter) is
/// checked again against each new policy with [`Auth::recheck`], by the credential it came
/// with: a reload that removes its principal or rotates its token ends its rights there too.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` on an open bus (no `[[principals]]`).
    principal: Option<Arc<Principal>>,
    /// What it authenticated with; `None` on an open bus.
    credential: Option<Credential>,
    /// The policy it was authenticated under ([`Policy::generation`]).
    generation: u64,
    /// The connection's usage of its limits, when the call came over a connection.
    connection: Option<Arc<Usage>>,
    remote: Option<SocketAddr>,
}

/// A remote address started too many verifications of unknown tokens
/// ([`NEW_TOKENS_PER_ADDRESS_PER_SECOND`]).
#[derive(Debug)]
struct TooManyNewTokens;

/// The credential a [`Caller`] authenticated with, kept so that it can be looked up again in
/// a reloaded policy (the token itself is not kept).
#[derive(Debug, Clone)]
enum Credential {
    /// A bearer token: the `token_hash` it matched. The PHC string is salted, so it stands for
    /// that one token; a principal given a new hash (a rotated token) no longer matches.
    Token(Arc<str>),
    /// A client certificate: its normalized subject and its alternative names.
    Certificate { subject: String, sans: Vec<String> },
}

impl Caller {
    /// The principal, if the bus authenticates.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_deref()
    }
}

/// Writes audit lines (target `eventbus::audit`, WARN), at most [`AUDIT_LINES_PER_SECOND`].
#[derive(Debug)]
struct Audit {
    lines: DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl Audit {
    fn new() -> Audit {
        let rate = NonZeroU32::new(AUDIT_LINES_PER_SECOND).expect("not zero");
        Audit {
            lines: RateLimiter::direct(Quota::per_second(rate)),
            suppressed: AtomicU64::new(0),
        }
    }

    fn record(
        &self,
        principal: &str,
        action: &str,
        target: &str,
        remote: Option<SocketAddr>,
        why: &str,
    ) {
        if self.lines.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let remote = remote.map(|r| r.to_string()).unwrap_or_default();
        tracing::warn!(
            target: "eventbus::audit",
            principal,
            action,
            target_name = target,
            remote = %remote,
            suppressed,
            "denied: {why}"
        );
    }
}

/// The bus's authentication and permissions, shared by every call; cheap to clone.
#[derive(Debug, Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

#[derive(Debug)]
struct AuthInner {
    policy: RwLock<Arc<Policy>>,
    /// The generation of the policy in `policy`, read without the lock on every delivery
    /// ([`Auth::recheck`]).
    generation: AtomicU64,
    /// SHA-256 of a token → the principal it is, for the current policy.
    tokens: Mutex<HashMap<[u8; 32], Arc<str>>>,
    /// SHA-256 of tokens that are no one's, for the current policy (bounded by
    /// [`MAX_REMEMBERED_TOKENS`]).
    wrong_tokens: Mutex<HashSet<[u8; 32]>>,
    /// Verifications of new tokens per remote address ([`NEW_TOKENS_PER_ADDRESS_PER_SECOND`]).
    new_tokens: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    verifying: tokio::sync::Semaphore,
    /// Per principal name, for the current policy.
    usage: Mutex<HashMap<Arc<str>, Arc<Usage>>>,
    audit: Audit,
    metrics: Metrics,
}

impl Auth {
    /// The policy of `config`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `principals` and the entry at fault.
    pub fn new(config: &AuthConfig, metrics: Metrics) -> Result<Auth, ConfigError> {
        Ok(Auth {
            inner: Arc::new(AuthInner {
                policy: RwLock::new(Arc::new(Policy::compile(config, 1)?)),
                generation: AtomicU64::new(1),
                tokens: Mutex::new(HashMap::new()),
                wrong_tokens: Mutex::new(HashSet::new()),
                new_tokens: RateLimiter::keyed(
                    Quota::per_second(
                        NonZeroU32::new(NEW_TOKENS_PER_ADDRESS_PER_SECOND).expect("non-zero"),
                    )
                    .allow_burst(NonZeroU32::new(NEW_TOKENS_PER_ADDRESS_BURST).expect("non-zero")),
                ),
                verifying: tokio::sync::Semaphore::new(VERIFYING_AT_ONCE),
                usage: Mutex::new(HashMap::new()),
                audit: Audit::new(),
                metrics,
            }),
        })
    }

    /// An open bus: no principals, default limits.
    pub fn open(metrics: Metrics) -> Auth {
        Auth::new(&AuthConfig::default(), metrics).expect("the empty config is valid")
    }

    fn policy(&self) -> Arc<Policy> {
        self.inner
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether no principals are configured, so anyone who reaches the port may do anything.
    pub fn is_open(&self) -> bool {
        self.policy().principals.is_empty()
    }

    /// How many principals the policy has.
    pub fn principal_count(&self) -> usize {
        self.policy().principals.len()
    }

    /// Puts `config` in force for every call from now on, and for open subscriptions at their
    /// next delivery.
    ///
    /// # Errors
    /// As [`Auth::new`], and [`ConfigError::Invalid`] (`principals`) for a config without
    /// principals while some are in force; the policy in force stays.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), ConfigError> {
        let mut slot = self.inner.policy.write().unwrap_or_else(|e| e.into_inner());
        let policy = Policy::compile(config, slot.generation + 1)?;
        if policy.principals.is_empty() && !slot.principals.is_empty() {
            // An emptied or truncated file (an editor saving in two steps) must not open the
            // bus to anyone who can reach it.
            return Err(ConfigError::Invalid {
                setting: "principals",
                rule: "the file now has none: a reload does not open a bus that authenticates \
                       (restart it without [[principals]] to run it open)"
                    .into(),
            });
        }
        let generation = policy.generation;
        // A known token stays known while its principal keeps the same hash, so a reload in the
        // middle of a flood of wrong tokens does not send known clients back to the verifiers.
        let kept = |name: &Arc<str>| {
            let hash = |policy: &Policy| {
                policy
                    .by_name
                    .get(name)
                    .and_then(|principal| principal.token_hash.clone())
            };
            hash(&slot).is_some() && hash(&slot) == hash(&policy)
        };
        self.inner
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, name| kept(name));
        // A principal's counts (subscriptions and queries open, its rate buckets) carry over
        // while its limits stay the same: the open streams' slots count against that usage, so
        // a reload does not hand a principal at its limit a fresh allowance. New limits start
        // new counts.
        self.inner
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, usage| {
                policy
                    .by_name
                    .get(name)
                    .is_some_and(|principal| principal.limits == *usage.limits())
            });
        *slot = Arc::new(policy);
        self.inner.generation.store(generation, Ordering::Release);
        self.inner
            .wrong_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }

    /// Who sends `headers` over `connection`.
    ///
    /// # Errors
    /// [`BusError::Unauthenticated`] when principals are configured and the call carries no
    /// credentials, a malformed `authorization` header, or a token or certificate no
    /// principal has. Each is counted and audited.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        connection: Option<&ConnectionInfo>,
    ) -> Result<Caller, BusError> {
        let policy = self.policy();
        let remote = connection.and_then(|c| c.remote_addr);
        let usage = connection.map(|c| c.usage.get_or_init(|| policy.limits.connection).clone());
        let caller = |principal, credential| Caller {
            principal,
            credential,
            generation: policy.generation,
            connection: usage.clone(),
            remote,
        };
        if policy.principals.is_empty() {
            return Ok(caller(None, None));
        }
        let refuse = |detail: String| {
            self.inner.metrics.auth_denied("authenticate");
            self.inner
                .audit
                .record("-", "authenticate", "", remote, &detail);
            BusError::Unauthenticated { detail }
        };
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    refuse("the authorization header must be `Bearer <token>`".into())
                })?;
            return match self.principal_of_token(&policy, token, remote).await {
                Err(TooManyNewTokens) => Err(refuse(format!(
                    "too many new tokens from this address (at most \
                     {NEW_TOKENS_PER_ADDRESS_PER_SECOND} a second are checked); retry later"
                ))),
                Ok(Some(principal)) => {
                    let credential = principal
                        .token_hash
                        .as_deref()
                        .map(|hash| Credential::Token(hash.into()));
                    Ok(caller(Some(principal), credential))
                }
                Ok(None) => Err(refuse("the bearer token is not any principal's".into())),
            };
        }
        if let Some(certificate) = connection.and_then(|c| c.peer_certificate.as_deref()) {
            let subject = normalize_subject(&certificate.subject);
            let sans = &certificate.subject_alt_names;
            return match policy.by_certificate(&subject, sans) {
                Some(principal) => Ok(caller(
                    Some(principal),
                    Some(Credential::Certificate {
                        subject,
                        sans: sans.clone(),
                    }),
                )),
                None => Err(refuse(format!(
                    "the client certificate (subject {subject:?}, alternative names {:?}) is \
                     not any principal's cert_subject or cert_san",
                    certificate.subject_alt_names
                ))),
            };
        }
        Err(refuse(
            "send `authorization: Bearer <token>`, or connect with a client certificate".into(),
        ))
    }

    /// The principal `token` is under `policy`: remembered, or found by argon2 verification
    /// against each principal's `token_hash` (off the async workers, [`VERIFYING_AT_ONCE`] at
    /// a time).
    ///
    /// # Errors
    /// [`TooManyNewTokens`] when `remote` has started more than
    /// [`NEW_TOKENS_PER_ADDRESS_PER_SECOND`] verifications of unknown tokens.
    async fn principal_of_token(
        &self,
        policy: &Arc<Policy>,
        token: &str,
        remote: Option<SocketAddr>,
    ) -> Result<Option<Arc<Principal>>, TooManyNewTokens> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let known = self
            .inner
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(name) = known {
            return Ok(policy.by_name.get(&name).cloned());
        }
        let wrong = |key| {
            self.inner
                .wrong_tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(key)
        };
        if wrong(&key) {
            return Ok(None);
        }
        if let Some(remote) = remote {
            if self.inner.new_tokens.len() > NEW_TOKEN_ADDRESSES {
                self.inner.new_tokens.retain_recent();
            }
            if self.inner.new_tokens.check_key(&remote.ip()).is_err() {
                return Err(TooManyNewTokens);
            }
        }
        let Ok(_permit) = self.inner.verifying.acquire().await else {
            return Ok(None);
        };
        let candidates: Vec<(Arc<str>, String)> = policy
            .principals
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.token_hash.clone()?)))
            .collect();
        let owned = token.to_owned();
        let name = tokio::task::spawn_blocking(move || {
            candidates.into_iter().find_map(|(name, hash)| {
                let hash = PasswordHash::new(&hash).ok()?;
                Argon2::default()
                    .verify_password(owned.as_bytes(), &hash)
                    .is_ok()
                    .then_some(name)
            })
        })
        .await
        .ok()
        .flatten();
        // Only for the policy it was checked against: a reload clears the memory.
        if self.policy().generation == policy.generation {
            match &name {
                Some(name) => {
                    let mut tokens = self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner());
                    if tokens.len() >= MAX_REMEMBERED_TOKENS {
                        tokens.clear();
                    }
                    tokens.insert(key, name.clone());
                }
                None => {
                    let mut wrong = self
                        .inner
                        .wrong_tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if wrong.len() >= MAX_REMEMBERED_TOKENS {
                        wrong.clear();
                    }
                    wrong.insert(key);
                }
            }
        }
        Ok(name.and_then(|name| policy.by_name.get(&name).cloned()))
    }

    /// Refuses: counts, audits, and returns the error.
    fn deny(&self, caller: &Caller, action: &'static str, target: &str, rule: String) -> BusError {
        let principal = caller.principal.as_ref().map_or("-", |p| &*p.name);
        self.inner.metrics.auth_denied(action);
        self.inner
            .audit
            .record(principal, action, target, caller.remote, &rule);
        BusError::PermissionDenied {
            principal: principal.to_owned(),
            action,
            target: target.to_owned(),
            rule,
        }
    }

    /// Brings a caller authenticated under an earlier policy up to the one in force: its
    /// principal is looked up again by the credential it came with (the same token hash, the
    /// same certificate). A no-op, one atomic load, while no reload has happened; called by
    /// long-lived streams before each batch and each delivery.
    ///
    /// # Errors
    /// [`BusError::Unauthenticated`] (counted and audited) when its credential is no longer
    /// any principal's (removed, or the token rotated), or when a reload turned on
    /// authentication under a caller of the open bus.
    pub fn recheck(&self, caller: &mut Caller) -> Result<(), BusError> {
        if self.inner.generation.load(Ordering::Acquire) == caller.generation {
            return Ok(());
        }
        let policy = self.policy();
        let principal = if policy.principals.is_empty() {
            None
        } else {
            let found = match &caller.credential {
                None => None,
                Some(Credential::Token(hash)) => policy
                    .principals
                    .iter()
                    .find(|p| p.token_hash.as_deref() == Some(&**hash))
                    .cloned(),
                Some(Credential::Certificate { subject, sans }) => {
                    policy.by_certificate(subject, sans)
                }
            };
            if found.is_none() {
                let detail = match (&caller.credential, &caller.principal) {
                    (None, _) => "the bus now authenticates callers (its configuration was \
                                  reloaded with [[principals]]): call again with credentials"
                        .to_owned(),
                    (Some(_), Some(was)) => format!(
                        "after a configuration reload its credential is no longer any \
                         principal's (principal {:?} was removed or its token or certificate \
                         name changed)",
                        was.name
                    ),
                    (Some(_), None) => "its credential is no longer any principal's".to_owned(),
                };
                let name = caller.principal.as_ref().map_or("-", |p| &*p.name);
                self.inner.metrics.auth_denied("authenticate");
                self.inner
                    .audit
                    .record(name, "authenticate", "", caller.remote, &detail);
                return Err(BusError::Unauthenticated { detail });
            }
            found
        };
        caller.principal = principal;
        caller.generation = policy.generation;
        Ok(())
    }

    /// Gives a `source`-less event its principal's source, before the event is checked (an
    /// open bus leaves it, and the usual rule refuses it).
    pub fn fill_source(&self, caller: &Caller, source: &mut String) {
        if let (true, Some(principal)) = (source.is_empty(), &caller.principal) {
            *source = principal.default_source().to_owned();
        }
    }

    /// Whether the caller may publish every one of `events` (all or none). `waiting_query` gives
    /// the topic of the query waiting on an inbox (on any node), if one is.
    ///
    /// # Errors
    /// [`BusError::PermissionDenied`] for the first event not allowed: its topic (`publish`),
    /// its source (`source`), or a reply into an inbox no query waits on, or of a query whose
    /// topic the principal may not subscribe to (`reply`).
    pub fn authorize_publish(
        &self,
        caller: &Caller,
        events: &[Event],
        waiting_query: impl Fn(&Topic) -> Option<Topic>,
    ) -> Result<(), BusError> {
        let Some(principal) = &caller.principal else {
            return Ok(());
        };
        for (index, event) in events.iter().enumerate() {
            let topic = &event.topic;
            if topic.is_inbox() {
                match waiting_query(topic) {
                    Some(query_topic) if !principal.subscribe.allows_topic(&query_topic) => {
                        return Err(self.deny(
                            caller,
                            "reply",
                            topic.as_str(),
                            format!(
                                "events[{index}]: only principals that may subscribe to the \
                                 query's topic {query_topic} may reply to it"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        return Err(self.deny(
                            caller,
                            "reply",
                            topic.as_str(),
                            format!(
                                "events[{index}]: no query waits for a reply on this inbox (it \
                                 was answered, timed out, or never existed)"
                            ),
                        ));
                    }
                }
            } else if !principal.publish.allows_topic(topic) {
                return Err(self.deny(
                    caller,
                    "publish",
                    topic.as_str(),
                    format!("events[{index}].topic is outside its publish permissions"),
                ));
            }
            if !principal.sources.is_empty()
                && !principal.sources.iter().any(|s| **s == *event.source)
            {
                return Err(self.deny(
                    caller,
                    "source",
                    &event.source,
                    format!(
                        "events[{index}].source must be one of {:?} (its `sources`)",
                        principal.sources
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the caller may subscribe to `pattern`, in `group` if any.
    ///
    /// # Errors
    /// [`BusError::PermissionDenied`]: `subscribe` for a pattern outside the allow lists,
    /// inside a deny pattern, or over reply inboxes; `join` for a group not in `groups`.
    pub fn authorize_subscribe(
        &self,
        caller: &Caller,
        pattern: &Pattern,
        group: Option<&str>,
    ) -> Result<(), BusError> {
        let Some(principal) = &caller.principal else {
            return Ok(());
        };
        check_subscribe(principal, pattern, group)
            .map_err(|(action, target, rule)| self.deny(caller, action, &target, rule))
    }

    /// Whether the caller may ack and nack in `group`.
    ///
    /// # Errors
    /// [`BusError::PermissionDenied`] (`join`) for a group not in its `groups`.
    pub fn authorize_group(&self, caller: &Caller, group: &str) -> Result<(), BusError> {
        let Some(principal) = &caller.principal else {
            return Ok(());
        };
        check_group(principal, group)
            .map_err(|(action, target, rule)| self.deny(caller, action, &target, rule))
    }

    /// Whether the caller may use AdminService.
    ///
    /// # Errors
    /// [`BusError::PermissionDenied`] (`admin`) unless its principal has `admin = true`.
    pub fn authorize_admin(&self, caller: &Caller, method: &str) -> Result<(), BusError> {
        match &caller.principal {
            Some(principal) if !principal.admin => Err(self.deny(
                caller,
                "admin",
                method,
                "AdminService needs `admin = true`".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The principal's usage of its limits (made on first use with the policy's limits).
    fn principal_usage(&self, principal: &Principal) -> Arc<Usage> {
        self.inner
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(principal.name.clone())
            .or_insert_with(|| {
                Arc::new(Usage::new(
                    Scope::Principal(principal.name.clone()),
                    principal.limits,
                ))
            })
            .clone()
    }

    /// The usages a call of `caller` counts against: its connection's and its principal's.
    fn usages(&self, caller: &Caller) -> Vec<Arc<Usage>> {
        let mut usages: Vec<Arc<Usage>> = caller.connection.iter().cloned().collect();
        if let Some(principal) = &caller.principal {
            usages.push(self.principal_usage(principal));
        }
        usages
    }

    fn limited(&self, caller: &Caller, error: BusError) -> BusError {
        if let BusError::LimitExceeded { limit, .. } = &error {
            self.inner.metrics.limit_exceeded(limit);
            let principal = caller.principal.as_ref().map_or("-", |p| &*p.name);
            self.inner
                .audit
                .record(principal, "limit", limit, caller.remote, &error.to_string());
        }
        error
    }

    /// Takes `events` events of `bytes` bytes from the caller's publish rates.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] naming the rate and its scope.
    pub fn admit_publish(
        &self,
        caller: &Caller,
        events: usize,
        bytes: usize,
    ) -> Result<(), BusError> {
        for usage in self.usages(caller) {
            usage
                .admit_publish(events, bytes)
                .map_err(|e| self.limited(caller, e))?;
        }
        Ok(())
    }

    /// Counts an open subscription of the caller's until the slots drop.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] (`subscriptions`).
    pub fn open_subscription(&self, caller: &Caller) -> Result<Vec<Slot>, BusError> {
        self.usages(caller)
            .iter()
            .map(|usage| {
                usage
                    .open_subscription()
                    .map_err(|e| self.limited(caller, e))
            })
            .collect()
    }

    /// Counts a query of the caller's in flight until the slots drop.
    ///
    /// # Errors
    /// [`BusError::LimitExceeded`] (`queries_in_flight`).
    pub fn start_query(&self, caller: &Caller) -> Result<Vec<Slot>, BusError> {
        self.usages(caller)
            .iter()
            .map(|usage| usage.start_query().map_err(|e| self.limited(caller, e)))
            .collect()
    }

    /// What decides, delivery by delivery, whether a subscription of `caller`'s to `pattern`
    /// may receive an event. On an open bus it lets everything through, until a reload turns
    /// authentication on.
    pub fn delivery_filter(
        &self,
        caller: &Caller,
        pattern: &Pattern,
        group: Option<&str>,
    ) -> DeliveryFilter {
        DeliveryFilter {
            auth: self.clone(),
            caller: caller.clone(),
            pattern: pattern.clone(),
            group: group.map(str::to_owned),
        }
    }
}

/// Decides per delivery what a subscription receives ([`Auth::delivery_filter`]).
#[derive(Debug)]
pub struct DeliveryFilter {
    auth: Auth,
    caller: Caller,
    pattern: Pattern,
    group: Option<String>,
}

impl DeliveryFilter {
    /// Whether an event on `topic` goes to the subscriber.
    ///
    /// # Errors
    /// After a reload that no longer allows the subscription: PERMISSION_DENIED, or
    /// UNAUTHENTICATED if its credential is no longer any principal's ([`Auth::recheck`]).
    /// The stream should end with it.
    pub fn admits(&mut self, topic: &Topic) -> Result<bool, BusError> {
        let before = self.caller.generation;
        self.auth.recheck(&mut self.caller)?;
        let Some(principal) = &self.caller.principal else {
            return Ok(true);
        };
        if self.caller.generation != before {
            check_subscribe(principal, &self.pattern, self.group.as_deref()).map_err(
                |(action, target, rule)| {
                    self.auth.deny(
                        &self.caller,
                        action,
                        &target,
                        format!("after a configuration reload: {rule}"),
                    )
                },
            )?;
        }
        Ok(!topic.as_str().starts_with(INBOX_PREFIX) && principal.subscribe.allows_topic(topic))
    }
}

type Refusal = (&'static str, String, String);

fn check_subscribe(
    principal: &Principal,
    pattern: &Pattern,
    group: Option<&str>,
) -> Result<(), Refusal> {
    let refuse = |rule: &str| Err(("subscribe", pattern.to_string(), rule.to_owned()));
    let inboxes = Pattern::parse(&format!("{INBOX_PREFIX}*")).expect("a valid pattern");
    if names_reserved(pattern) && pattern.intersects(&inboxes) {
        return refuse(
            "reply inboxes are the bus's own: a query's answer comes back on its Query call",
        );
    }
    let reserved = names_reserved(pattern);
    if !principal
        .subscribe
        .allow
        .iter()
        .any(|allow| allow.covers(pattern) && (!reserved || names_reserved(allow)))
    {
        return refuse("the pattern is not inside its subscribe permissions");
    }
    if let Some(deny) = principal.subscribe.deny.iter().find(|d| d.covers(pattern)) {
        return refuse(&format!("the pattern is inside subscribe_deny {deny}"));
    }
    match group {
        Some(group) => check_group(principal, group),
        None => Ok(()),
    }
}

fn check_group(principal: &Principal, group: &str) -> Result<(), Refusal> {
    match &principal.groups {
        Some(groups) if !groups.contains(group) => {
            let mut allowed: Vec<&String> = groups.iter().collect();
            allowed.sort();
            Err((
                "join",
                group.to_owned(),
                format!("the group is not in its `groups` {allowed:?}"),
            ))
        }
        _ => Ok(()),
    }
}

/// Authenticates every `eventbus.v1` call before it reaches the services (health and
/// reflection pass), and puts the [`Caller`] in its extensions; an unauthenticated call is
/// answered UNAUTHENTICATED without its body being read.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Auth,
}

impl AuthLayer {
    pub fn new(auth: Auth) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    auth: Auth,
    inner: S,
}

/// The gRPC package whose calls need a principal.
const GUARDED_PREFIX: &str = "/eventbus.v1.";

impl<S> tonic::codegen::Service<http::Request<Body>> for AuthService<S>
where
    S: tonic::codegen::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule for cloned services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !request.uri().path().starts_with(GUARDED_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let auth = self.auth.clone();
        Box::pin(async move {
            let connection = request.extensions().get::<ConnectionInfo>().cloned();
            match auth
                .authenticate(request.headers(), connection.as_ref())
                .await
            {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(error) => Ok(crate::service::status::to_status(&error).into_http()),
            }
        })
    }
}

/// The caller of `request`, as [`AuthLayer`] found it. A request that did not pass the layer
/// (built in process) is an open bus's caller only if `auth` is open: fails closed.
///
/// # Errors
/// [`BusError::Unauthenticated`] for a request that carries no caller on a bus with principals.
pub fn caller_of<T>(auth: &Auth, request: &tonic::Request<T>) -> Result<Caller, BusError> {
    match request.extensions().get::<Caller>() {
        Some(caller) => Ok(caller.clone()),
        None if auth.is_open() => Ok(Caller {
            principal: None,
            credential: None,
            generation: auth.inner.generation.load(Ordering::Acquire),
            connection: None,
            remote: None,
        }),
        None => Err(BusError::Unauthenticated {
            detail: "the call did not pass authentication".into(),
        }),
    }
}

/// An argon2id hash of `token` as a PHC string, for a principal's `token_hash`, with a fresh
/// random salt and the `argon2` crate's default cost (19 MiB, 2 passes: OWASP's minimum).
pub fn hash_token(token: &str) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any input")
        .to_string()
}

/// A new random bearer token: 32 bytes from the OS, base64url without padding (43 characters).
pub fn generate_token() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(entry: PrincipalConfig) -> Arc<Principal> {
        Policy::compile(
            &AuthConfig {
                principals: vec![entry],
                limits: LimitsConfig::default(),
            },
            1,
        )
        .unwrap()
        .principals[0]
            .clone()
    }

    fn entry(publish: &[&str], subscribe: &[&str], subscribe_deny: &[&str]) -> PrincipalConfig {
        PrincipalConfig {
            name: "svc".into(),
            token_hash: None,
            cert_subject: Some("CN=svc".into()),
            cert_san: None,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            publish_deny: vec!["user.secret".into()],
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            subscribe_deny: subscribe_deny.iter().map(|s| s.to_string()).collect(),
            groups: Some(vec!["g".into()]),
            admin: false,
            sources: None,
            limits: None,
        }
    }

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    fn pattern(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn publish_deny_wins_over_allow() {
        let p = principal(entry(&["user.>"], &[], &[]));
        assert!(p.publish.allows_topic(&topic("user.created")));
        assert!(!p.publish.allows_topic(&topic("user.secret")));
        assert!(!p.publish.allows_topic(&topic("order.created")));
    }

    #[test]
    fn subscribe_must_lie_inside_an_allow_pattern() {
        let p = principal(entry(&[], &["user.*", "_bus.dlq.g"], &["user.secret"]));
        assert!(check_subscribe(&p, &pattern("user.query"), None).is_ok());
        assert!(check_subscribe(&p, &pattern("user.*"), None).is_ok());
        assert!(check_subscribe(&p, &pattern("user.>"), None).is_err());
        assert!(check_subscribe(&p, &pattern("user.secret"), None).is_err());
        assert!(check_subscribe(&p, &pattern("_bus.dlq.g"), None).is_ok());
        assert!(check_subscribe(&p, &pattern("user.query"), Some("other")).is_err());
        assert!(check_subscribe(&p, &pattern("user.query"), Some("g")).is_ok());
    }

    #[test]
    fn wildcards_do_not_grant_reserved_topics_and_inboxes_are_never_granted() {
        let p = principal(entry(&[">"], &[">", "_bus.>"], &[]));
        assert!(check_subscribe(&p, &pattern(">"), None).is_ok());
        assert!(check_subscribe(&p, &pattern("_bus.inbox.*"), None).is_err());
        assert!(check_subscribe(&p, &pattern("_bus.>"), None).is_err());
        assert!(check_subscribe(&p, &pattern("_bus.dlq.*"), None).is_ok());
        let q = principal(entry(&[">"], &[">"], &[]));
        assert!(check_subscribe(&q, &pattern("_bus.dlq.g"), None).is_err());
        assert!(!q.subscribe.allows_topic(&topic("_bus.dlq.g")));
        assert!(q.subscribe.allows_topic(&topic("a.b")));
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        let mut bad = entry(&["user..x"], &[], &[]);
        let error = Policy::compile(
            &AuthConfig {
                principals: vec![bad.clone()],
                limits: LimitsConfig::default(),
            },
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("principals: [0] (name \"svc\"): publish[0]"),
            "{error}"
        );
        bad.publish.clear();
        bad.cert_subject = None;
        let error = Policy::compile(
            &AuthConfig {
                principals: vec![bad.clone()],
                limits: LimitsConfig::default(),
            },
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("needs token_hash"), "{error}");
        bad.token_hash = Some("plain-text-token".into());
        let error = Policy::compile(
            &AuthConfig {
                principals: vec![bad],
                limits: LimitsConfig::default(),
            },
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not a PHC hash string"), "{error}");
    }

    #[test]
    fn a_reload_never_opens_a_bus_that_authenticates() {
        let config = AuthConfig {
            principals: vec![entry(&["a"], &[], &[])],
            limits: LimitsConfig::default(),
        };
        let auth = Auth::new(&config, Metrics::new()).unwrap();
        let error = auth.reload(&AuthConfig::default()).unwrap_err().to_string();
        assert!(error.contains("does not open a bus"), "{error}");
        assert!(!auth.is_open());
        // An open bus reloads into principals, and another set of principals is fine.
        let open = Auth::open(Metrics::new());
        open.reload(&config).unwrap();
        assert!(!open.is_open());
    }

    #[tokio::test]
    async fn a_client_certificate_authenticates_by_its_subject() {
        let mut config = entry(&["a"], &[], &[]);
        config.cert_subject = Some("CN=svc, O=Acme".into());
        let auth = Auth::new(
            &AuthConfig {
                principals: vec![config],
                limits: LimitsConfig::default(),
            },
            Metrics::new(),
        )
        .unwrap();
        let connection = |subject: &str| ConnectionInfo {
            id: 1,
            remote_addr: None,
            peer_certificate: Some(Arc::new(crate::accept::PeerCertificate {
                subject: subject.into(),
                subject_alt_names: vec![],
            })),
            usage: Arc::default(),
        };
        let headers = http::HeaderMap::new();
        let caller = auth
            .authenticate(&headers, Some(&connection("CN=svc,O=Acme")))
            .await
            .unwrap();
        assert_eq!(caller.principal().unwrap().name(), "svc");
        let refused = auth
            .authenticate(&headers, Some(&connection("CN=other")))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("\"CN=other\""), "{refused}");
    }

    #[tokio::test]
    async fn a_token_authenticates_as_its_principal_and_others_do_not() {
        let token = generate_token();
        let mut config = entry(&["a"], &[], &[]);
        config.cert_subject = None;
        config.token_hash = Some(hash_token(&token));
        let auth = Auth::new(
            &AuthConfig {
                principals: vec![config],
                limits: LimitsConfig::default(),
            },
            Metrics::new(),
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let caller = auth.authenticate(&headers, None).await.unwrap();
        assert_eq!(caller.principal().unwrap().name(), "svc");
        // Remembered: the second time needs no argon2.
        assert!(auth.authenticate(&headers, None).await.is_ok());
        headers.insert(http::header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(matches!(
            auth.authenticate(&headers, None).await,
            Err(BusError::Unauthenticated { .. })
        ));
        assert!(matches!(
            auth.authenticate(&http::HeaderMap::new(), None).await,
            Err(BusError::Unauthenticated { .. })
        ));
    }

    #[tokio::test]
    async fn a_reload_keeps_a_principals_counts_while_its_limits_stay() {
        let token = generate_token();
        let mut entry = entry(&["a"], &[], &[]);
        entry.cert_subject = None;
        entry.token_hash = Some(hash_token(&token));
        entry.limits = Some(Limits {
            subscriptions: Some(1),
            ..Limits::default()
        });
        let config = AuthConfig {
            principals: vec![entry],
            limits: LimitsConfig::default(),
        };
        let auth = Auth::new(&config, Metrics::new()).unwrap();
        let mut headers = http::HeaderMap::new();
        let bearer = format!("Bearer {token}");
        headers.insert(http::header::AUTHORIZATION, bearer.parse().unwrap());
        let mut caller = auth.authenticate(&headers, None).await.unwrap();
        let open = auth.open_subscription(&caller).unwrap();
        assert!(auth.open_subscription(&caller).is_err(), "at its limit");
        // The same limits: still at the limit after the reload, free again once it closes.
        auth.reload(&config).unwrap();
        auth.recheck(&mut caller).unwrap();
        assert!(
            auth.open_subscription(&caller).is_err(),
            "a reload is no new allowance"
        );
        drop(open);
        let again = auth.open_subscription(&caller).unwrap();
        // New limits start new counts.
        let mut raised = config.clone();
        raised.principals[0].limits = Some(Limits {
            subscriptions: Some(2),
            ..Limits::default()
        });
        auth.reload(&raised).unwrap();
        auth.recheck(&mut caller).unwrap();
        let _more = auth.open_subscription(&caller).unwrap();
        drop(again);
    }

    #[tokio::test]
    async fn a_known_token_stays_known_across_a_reload_that_keeps_its_hash() {
        let token = generate_token();
        let mut config = entry(&["a"], &[], &[]);
        config.cert_subject = None;
        config.token_hash = Some(hash_token(&token));
        let config = AuthConfig {
            principals: vec![config],
            limits: LimitsConfig::default(),
        };
        let auth = Auth::new(&config, Metrics::new()).unwrap();
        let mut headers = http::HeaderMap::new();
        let bearer = format!("Bearer {token}");
        headers.insert(http::header::AUTHORIZATION, bearer.parse().unwrap());
        auth.authenticate(&headers, None).await.unwrap();
        let known = || auth.inner.tokens.lock().unwrap().len();
        assert_eq!(known(), 1);
        // The same entry (a comment added, another setting changed): still known, no argon2.
        auth.reload(&config).unwrap();
        assert_eq!(known(), 1);
        assert!(auth.authenticate(&headers, None).await.is_ok());
        // A new hash (a rotation, even of the same token): verified again under the new policy.
        let mut rotated = config.clone();
        rotated.principals[0].token_hash = Some(hash_token(&token));
        auth.reload(&rotated).unwrap();
        assert_eq!(known(), 0);
    }
}
