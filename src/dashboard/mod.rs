//! The dashboard: a web page the admin listener serves (`/`, `/dashboard/`), and the JSON and
//! server-sent-event API it reads (`/api/v1/...`). It shows what event-driven services are
//! criticised for hiding: the web of who publishes, subscribes to and answers whom, with live
//! rates; each topic's rate, held events, subscribers and groups; a live tail of a pattern; and
//! one conversation (every event of one correlation id) on a timeline that shows which answer
//! was the slowest.
//!
//! # Where the data comes from
//! Everything is read from what the bus already keeps, never from a second bookkeeping on the
//! publish path: the topic table, the topology and the groups (as `ListTopics`, `GetTopology`
//! and `ListGroups` read them, with the other nodes' subscribers on a cluster), a few metrics,
//! and **the log** itself. The live tail reads the log after each change of the visible head
//! ([`tail`]), so it is no subscription: it never counts as a responder, never shows in the
//! topology and never slows routing. The conversation view scans the newest
//! [`conversation::SCAN_EVENTS`] events of the log for the correlation id.
//!
//! # Who may see event data
//! The tail and the conversation view show event contents. On a bus with authentication
//! (tokens or client certificates, [`crate::auth`]) they answer 403: the admin listener has no
//! caller identity to check against the bus's permissions. The overview (names and counts, as
//! `/metrics` exposes them in aggregate) is served either way; the admin address should be
//! reachable only by operators, as the README says.
//!
//! # The front end
//! Sources, lockfile and build script are in `dashboard/` (plain JavaScript, Cytoscape.js with
//! the dagre layout, bundled by esbuild); the built files in `dashboard/dist/` are committed and
//! embedded in the binary at compile time ([`assets`]), so `eventbus serve` serves the page with
//! no network and no npm. `scripts/test-dashboard.sh` rebuilds them and fails if the committed
//! files differ, then drives the page in headless Chromium.

pub mod api;
pub mod assets;
pub mod conversation;
pub mod tail;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::sync::Semaphore;

use crate::auth::Auth;
use crate::broker::Broker;

/// Live tails served at once, at most; the next is refused with 503 until one ends. Each holds
/// a task and reads the log after every change of the head.
pub const MAX_TAILS: usize = 16;

/// What the dashboard's handlers read; cheap to clone.
#[derive(Clone)]
pub struct DashboardState {
    pub(crate) broker: Broker,
    /// Decides whether event contents may be shown ([`DashboardState::shows_event_data`]).
    pub(crate) auth: Auth,
    /// Permits for [`MAX_TAILS`] tails.
    pub(crate) tails: Arc<Semaphore>,
}

impl DashboardState {
    /// The state over `broker`, with `auth` the bus's authentication (read at each request, so
    /// a reload that turns it on closes the event views at once).
    pub fn new(broker: Broker, auth: Auth) -> DashboardState {
        DashboardState {
            broker,
            auth,
            tails: Arc::new(Semaphore::new(MAX_TAILS)),
        }
    }

    /// Whether the tail and the conversation view may show event contents: only on an open bus
    /// (no authentication configured). See the module docs.
    pub fn shows_event_data(&self) -> bool {
        self.auth.is_open()
    }
}

/// The dashboard's routes: the page and its assets, and the API under `/api/v1`.
pub fn router(state: DashboardState) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/dashboard", get(assets::index))
        .route("/dashboard/", get(assets::index))
        .route("/dashboard/{*file}", get(assets::file))
        .route("/api/v1/overview", get(api::overview))
        .route("/api/v1/tail", get(tail::tail))
        .route("/api/v1/conversations", get(conversation::recent))
        .route(
            "/api/v1/conversations/{correlation_id}",
            get(conversation::one),
        )
        .with_state(state)
}
