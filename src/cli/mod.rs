//! The `eventbus` command line: `serve` runs the bus; every other command is a client of a
//! running bus, built on the Rust SDK, in the spirit of the `nats` CLI.
//!
//! - `client`: the client commands (publish, subscribe, query, reply, topics, topology).
//! - `format`: what they print, as pure functions with unit tests.
//! - `cloudevent`: events as CloudEvents 1.0 JSON, for `--json` and `publish --cloudevent`.
//! - `json`: what the other read verbs print with `--json`.
//! - `ops`: the operator's verbs: `groups`, `server info`, `server check`.
//! - `docs`: shell completions and man pages, made from the clap definition.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::ServeArgs;
use crate::sdk::Start;

mod client;
pub mod cloudevent;
pub mod docs;
pub mod json;
pub mod ops;

/// `eventbus repair`: see [`crate::store::file::repair`]. Prints what it did, one line each.
fn repair(args: &RepairArgs) -> anyhow::Result<()> {
    if !args.data_dir.join("log").is_dir() {
        anyhow::bail!(
            "{} holds no eventbus log (no log/ folder)",
            args.data_dir.display()
        );
    }
    let report = crate::store::file::repair(&args.data_dir)?;
    if !report.changed_anything() {
        println!("the log, its identity and the group cursors are intact; nothing moved");
        return Ok(());
    }
    for path in &report.moved {
        println!("moved aside: {}", path.display());
    }
    for (path, first, last) in &report.intact_set_aside {
        println!(
            "intact records {first}..={last} followed the damage and left the log; they are in {}",
            path.display()
        );
    }
    match report.kept_through {
        Some(sequence) => println!("the log keeps sequences up to {sequence}"),
        None => println!("the log keeps no events"),
    }
    if let Some(id) = &report.new_log_id {
        println!(
            "the log has a new identity, {id}: clients that resume see a new log and start over \
             from its earliest event"
        );
    }
    if report.groups_file_damaged {
        println!(
            "groups.json was unreadable: kept the cursors of {} group(s) ({}); any other group \
             starts as a new group",
            report.groups_kept.len(),
            report.groups_kept.join(", ")
        );
    }
    for group in &report.groups_moved_back {
        println!("group {group}: cursor moved back to the end of the kept log");
    }
    Ok(())
}
pub mod bench;
pub mod format;
mod serve;

/// `eventbus --version`: the release and the git commit it was built from (`unknown` outside a
/// git checkout), e.g. `eventbus 0.1.0 (commit 59393bb4...)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EVENTBUS_GIT_COMMIT"),
    ")"
);

/// A gRPC event bus for microservices that talk asynchronously.
#[derive(Debug, Parser)]
#[command(name = "eventbus", version = VERSION, about)]
pub struct Cli {
    /// The bus the client verbs talk to, given before the verb (`eventbus --server URL
    /// topics`, as the `nats` CLI takes it); after the verb works too. See the verb's
    /// `--server` for the forms it takes.
    #[arg(long = "server", id = "server_before_verb", value_name = "SERVER")]
    pub server: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command with a `--server` given before the verb moved into it.
    ///
    /// Errors: `--server` before a verb that talks to no bus (`serve`, `repair`, ...), or
    /// before and after the verb with different values.
    pub fn into_command(self) -> anyhow::Result<Command> {
        let mut command = self.command;
        let Some(before) = self.server else {
            return Ok(command);
        };
        let Some(target) = command.server_arg_mut() else {
            anyhow::bail!(
                "--server before the verb is for the client verbs (publish, subscribe, query, \
                 reply, topics, topology, groups, server, bench); `serve` listens with --listen"
            );
        };
        // After the verb it is the flag's, the environment's or the default value: only an
        // explicit flag there differs from the last two.
        let implied = std::env::var("EVENTBUS_SERVER")
            .ok()
            .filter(|server| !server.is_empty())
            .unwrap_or_else(default_server);
        if target.server != implied && target.server != before {
            anyhow::bail!(
                "--server is given before the verb ({before}) and after it ({}): give it once",
                target.server
            );
        }
        target.server = before;
        Ok(command)
    }
}

/// Where client commands find the bus.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// The bus to talk to: one URL, or several nodes of a cluster separated by commas (the
    /// client moves to the next when one is gone); `EVENTBUS_URL` is read when neither this nor
    /// `EVENTBUS_SERVER` is set.
    #[arg(
        long,
        env = "EVENTBUS_SERVER",
        default_value_t = default_server(),
        global = true
    )]
    pub server: String,
    /// PEM file of a CA to trust for `https://` URLs, besides the system's roots.
    #[arg(long, env = "EVENTBUS_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for a bus with mutual TLS (with --tls-key).
    #[arg(long, env = "EVENTBUS_TLS_CERT", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EVENTBUS_TLS_KEY", global = true)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Bearer token sent with every call (`authorization: Bearer <token>`). Arguments are
    /// visible to other users in `ps`: prefer `EVENTBUS_TOKEN`. With a token, pass a
    /// `--source` (and for `reply` a `--group`) your principal may use.
    #[arg(long, env = "EVENTBUS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

impl Command {
    /// Where a client verb finds the bus; `None` for the verbs that talk to no bus.
    pub fn server_arg_mut(&mut self) -> Option<&mut ServerArg> {
        match self {
            Command::Publish(args) => Some(&mut args.server),
            Command::Subscribe(args) => Some(&mut args.server),
            Command::Query(args) => Some(&mut args.server),
            Command::Reply(args) => Some(&mut args.server),
            Command::Topics(args) => Some(&mut args.server),
            Command::Topology(args) => Some(&mut args.server),
            Command::Groups(args) => Some(&mut args.server),
            Command::Server(ops::ServerCommand::Info(args)) => Some(&mut args.server),
            Command::Server(ops::ServerCommand::Check(args)) => Some(&mut args.server),
            Command::Bench(command) => Some(command.server_arg_mut()),
            Command::Serve(_)
            | Command::Repair(_)
            | Command::HashToken(_)
            | Command::Completions(_)
            | Command::Man(_) => None,
        }
    }
}

/// `$EVENTBUS_URL` if set (the name the Python and TypeScript clients and the scenario's
/// services share), else `http://127.0.0.1:50051`.
pub fn default_server() -> String {
    crate::sdk::default_url()
}

/// The source (service) name client commands use unless told otherwise.
pub const CLI_SOURCE: &str = "eventbus-cli";

/// The consumer group `eventbus reply` joins unless told otherwise, so that several responders
/// started for a try-out share the queries instead of all answering.
pub const REPLY_GROUP: &str = "eventbus-reply";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bus.
    Serve(Box<ServeArgs>),
    /// Publish an event (or --count copies) and print its sequence.
    Publish(PublishArgs),
    /// Print the events on a topic pattern, one line each.
    Subscribe(SubscribeArgs),
    /// Ask a question over events and print the reply's data.
    Query(QueryArgs),
    /// Answer queries on a topic: echo them, or answer with fixed data.
    Reply(ReplyArgs),
    /// List the topics the bus has seen.
    Topics(TopicsArgs),
    /// Show who publishes and subscribes to what.
    Topology(TopologyArgs),
    /// List the consumer groups: members; for MANUAL-ack groups the cursor, pending, in
    /// flight, redelivered and dead-lettered counts.
    Groups(ops::GroupsArgs),
    /// Ask the bus about itself (`info`), or probe it for monitoring (`check`).
    #[command(subcommand)]
    Server(ops::ServerCommand),
    /// Measure a running bus from here: publish throughput (`pub`), delivery to subscribers
    /// (`sub`), or query round trips (`query`), with latency percentiles.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make a file store that fails recovery openable again: the log keeps the records before
    /// the first damaged one; the damaged bytes and the intact records after them go into
    /// <data-dir>/damaged/ (nothing is deleted); an unreadable groups.json or log-id is set
    /// aside too. Run with the bus stopped.
    Repair(RepairArgs),
    /// Print the argon2 hash of a bearer token for a principal's `token_hash`. The token is read
    /// from stdin (one line) unless given, so it stays out of shell history; `--generate` makes
    /// a new random token and prints it, then its hash.
    HashToken(HashTokenArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff), or write one page per command with --dir.
    Man(docs::ManArgs),
}

/// `eventbus hash-token`.
#[derive(Debug, Clone, Args)]
pub struct HashTokenArgs {
    /// The token; read from stdin when absent. Arguments are visible to other users in `ps`.
    pub token: Option<String>,
    /// Make a new random token (32 bytes, base64url) instead of reading one: prints the token
    /// on the first line and its hash on the second.
    #[arg(long, conflicts_with = "token")]
    pub generate: bool,
}

/// Runs `hash-token`.
fn hash_token(args: &HashTokenArgs) -> anyhow::Result<()> {
    let token = if args.generate {
        let token = crate::auth::generate_token();
        println!("{token}");
        token
    } else if let Some(token) = &args.token {
        token.clone()
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if token.is_empty() {
        anyhow::bail!("token: must not be empty");
    }
    println!("{}", crate::auth::hash_token(&token));
    Ok(())
}

/// `eventbus repair`.
#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// The file store's directory, as given to `serve --data-dir`.
    #[arg(long, env = "EVENTBUS_DATA_DIR", default_value = "eventbus-data")]
    pub data_dir: std::path::PathBuf,
}

/// Fields of a published or asked event.
#[derive(Debug, Clone, Args)]
pub struct EventArgs {
    /// The event type (default: the topic).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// An attribute, KEY=VALUE; repeatable.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = format::parse_attr)]
    pub attrs: Vec<(String, String)>,
    /// The media type of the data, e.g. application/json.
    #[arg(long)]
    pub content_type: Option<String>,
    /// The correlation id (the bus makes one for queries when unset).
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// The service name to publish as.
    #[arg(long, default_value = CLI_SOURCE)]
    pub source: String,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The topic to publish to.
    #[arg(required_unless_present = "cloudevent", conflicts_with = "cloudevent")]
    pub topic: Option<String>,
    /// The data; read from stdin when `-` or absent.
    #[arg(conflicts_with = "cloudevent")]
    pub data: Option<String>,
    /// Publish a CloudEvents 1.0 JSON document (structured mode) read from FILE, or from stdin
    /// when `-`: what `subscribe --json` prints. Its `topic` extension, or --topic, names the
    /// topic; its `source` wins over --source. `sequence` and `publishtime` are the bus's and
    /// are ignored.
    #[arg(
        long,
        value_name = "FILE|-",
        conflicts_with_all = ["event_type", "attrs", "content_type", "correlation_id"]
    )]
    pub cloudevent: Option<String>,
    /// With --cloudevent: the topic, instead of the document's `topic` extension.
    #[arg(long = "topic", value_name = "TOPIC", requires = "cloudevent")]
    pub cloudevent_topic: Option<String>,
    #[command(flatten)]
    pub event: EventArgs,
    /// Publish the event this many times (batched over one stream).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// The topic pattern, e.g. `orders.*` or `orders.>`.
    pub pattern: String,
    /// Join this consumer group (members share the events).
    #[arg(long)]
    pub group: Option<String>,
    /// Where to start: earliest, latest, a sequence (resume after it) or an RFC 3339 time.
    #[arg(long, default_value = "latest", value_parser = format::parse_start)]
    pub from: Start,
    /// Start with the events published within this long before now, e.g. `5m`, `1h 30m`
    /// (instead of --from).
    #[arg(long, conflicts_with = "from", value_parser = crate::timefmt::parse_duration)]
    pub since: Option<Duration>,
    /// One CloudEvents 1.0 JSON object per line (the bus's fields as the extensions `topic`,
    /// `sequence`, `publishtime`, `correlationid`, `causationid`, `replyto`; data as JSON, text
    /// or data_base64). Attributes whose names CloudEvents cannot hold are left out, with a
    /// note on stderr.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// The subscriber name shown in the topology.
    #[arg(long, default_value = CLI_SOURCE)]
    pub subscriber: String,
    /// Join the group as a MANUAL-ack member (at-least-once; the bus keeps the group's
    /// cursor) and acknowledge each event once printed. Needs --group.
    #[arg(long, requires = "group")]
    pub ack: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// The topic to ask on.
    pub topic: String,
    /// The query data; `-` reads stdin.
    pub data: String,
    /// How long to wait for the reply, e.g. 500ms, 5s.
    #[arg(long, default_value = "5s", value_parser = crate::timefmt::parse_duration)]
    pub timeout: Duration,
    /// Print the whole reply as one CloudEvents 1.0 JSON object instead of its data.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub event: EventArgs,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Clone, Args)]
pub struct ReplyArgs {
    /// The topic (or pattern) to answer on.
    pub topic: String,
    /// The consumer group; responders in one group share the queries.
    #[arg(long, default_value = REPLY_GROUP)]
    pub group: String,
    /// Answer every query with this data instead of echoing it.
    #[arg(long)]
    pub data: Option<String>,
    /// Exit after answering this many queries.
    #[arg(long)]
    pub count: Option<u64>,
    /// The service name to answer as.
    #[arg(long, default_value = CLI_SOURCE)]
    pub source: String,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsArgs {
    /// Only topics matching this pattern. Every page of the list is fetched.
    #[arg(long)]
    pub pattern: Option<String>,
    /// One JSON array of topics (proto field names; times as RFC 3339) instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Debug, Clone, Args)]
pub struct TopologyArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = format::TopologyFormat::Text)]
    pub format: format::TopologyFormat,
    /// Same as `--format json`: one JSON document with the nodes and edges.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Edges at most; the server's default (10000) when 0, its maximum 100000.
    #[arg(long, default_value_t = 0)]
    pub max_edges: u32,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Runs one command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.into_command()?;
    if !matches!(command, Command::Serve(_)) {
        client_logging();
    }
    match command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Publish(args) => client::publish(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Query(args) => client::query(args).await,
        Command::Reply(args) => client::reply(args).await,
        Command::Topics(args) => client::topics(args).await,
        Command::Topology(args) => client::topology(args).await,
        Command::Groups(args) => ops::groups(args).await,
        Command::Server(command) => ops::server(command).await,
        Command::Bench(command) => bench::run(command).await,
        Command::Repair(args) => repair(&args),
        Command::HashToken(args) => hash_token(&args),
        Command::Completions(args) => docs::completions(&args),
        Command::Man(args) => docs::man(&args),
    }
}

/// SDK logs (resumes, handler failures) on stderr, only when `RUST_LOG` asks for them: the
/// client commands already print what matters, and stdout stays for data.
fn client_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("eventbus").chain(args.iter().copied()))
            .unwrap()
            .into_command()
            .unwrap()
    }

    #[test]
    fn server_goes_before_or_after_the_verb() {
        for args in [
            &["--server", "http://h:1", "topics"][..],
            &["topics", "--server", "http://h:1"],
            &["--server", "http://h:1", "topics", "--server", "http://h:1"],
        ] {
            let Command::Topics(topics) = parse(args) else {
                panic!("not topics")
            };
            assert_eq!(topics.server.server, "http://h:1", "{args:?}");
        }
        let Command::Server(ops::ServerCommand::Check(check)) =
            parse(&["--server", "h:2", "server", "check"])
        else {
            panic!("not server check")
        };
        assert_eq!(check.server.server, "h:2");
        let twice =
            Cli::try_parse_from(["eventbus", "--server", "a:1", "topics", "--server", "b:1"])
                .unwrap()
                .into_command()
                .unwrap_err()
                .to_string();
        assert!(twice.contains("give it once"), "{twice}");
        let serve = Cli::try_parse_from(["eventbus", "--server", "a:1", "serve"])
            .unwrap()
            .into_command()
            .unwrap_err()
            .to_string();
        assert!(serve.contains("--listen"), "{serve}");
    }

    #[test]
    fn publish_flags() {
        let Command::Publish(args) = parse(&[
            "publish",
            "a.b",
            "hello",
            "--type",
            "greeting",
            "--attr",
            "k=v",
            "--attr",
            "x=y",
            "--count",
            "3",
            "--server",
            "http://h:1",
        ]) else {
            panic!("not publish")
        };
        assert_eq!(args.topic.as_deref(), Some("a.b"));
        assert_eq!(args.data.as_deref(), Some("hello"));
        assert_eq!(args.event.event_type.as_deref(), Some("greeting"));
        assert_eq!(
            args.event.attrs,
            vec![("k".into(), "v".into()), ("x".into(), "y".into())]
        );
        assert_eq!(args.count, 3);
        assert_eq!(args.server.server, "http://h:1");
        assert_eq!(args.event.source, CLI_SOURCE);
    }

    #[test]
    fn client_commands_take_tls_and_token_flags() {
        let Command::Topics(args) = parse(&[
            "topics",
            "--server",
            "https://bus:443",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "client.pem",
            "--tls-key",
            "client-key.pem",
            "--token",
            "s3cret",
        ]) else {
            panic!("not topics")
        };
        let server = args.server;
        assert_eq!(server.server, "https://bus:443");
        assert_eq!(server.tls_ca.as_deref(), Some("ca.pem".as_ref()));
        assert_eq!(server.tls_cert.as_deref(), Some("client.pem".as_ref()));
        assert_eq!(server.tls_key.as_deref(), Some("client-key.pem".as_ref()));
        assert_eq!(server.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn publish_refuses_zero_count_and_bad_attrs() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("eventbus").chain(args.iter().copied()))
        };
        assert!(parse(&["publish", "a", "x", "--count", "0"]).is_err());
        assert!(parse(&["publish", "a", "x", "--attr", "novalue"]).is_err());
    }

    #[test]
    fn subscribe_from_positions() {
        let Command::Subscribe(args) = parse(&["subscribe", "a.>", "--from", "17", "--json"])
        else {
            panic!("not subscribe")
        };
        assert_eq!(args.from, Start::AfterSequence(17));
        assert!(args.json);
        let Command::Subscribe(args) = parse(&["subscribe", "a.>", "--since", "5m"]) else {
            panic!("not subscribe")
        };
        assert_eq!(args.since, Some(Duration::from_secs(300)));
        assert!(Cli::try_parse_from([
            "eventbus",
            "subscribe",
            "a",
            "--since",
            "5m",
            "--from",
            "1"
        ])
        .is_err());
        let Command::Subscribe(args) = parse(&["subscribe", "a.*", "--group", "g"]) else {
            panic!("not subscribe")
        };
        assert_eq!(args.from, Start::Latest);
        assert_eq!(args.group.as_deref(), Some("g"));
    }

    #[test]
    fn query_and_reply_defaults() {
        let Command::Query(args) = parse(&["query", "user.query", "42", "--timeout", "250ms"])
        else {
            panic!("not query")
        };
        assert_eq!(args.timeout, Duration::from_millis(250));
        let Command::Reply(args) = parse(&["reply", "user.query", "--data", "fixed"]) else {
            panic!("not reply")
        };
        assert_eq!(args.group, REPLY_GROUP);
        assert_eq!(args.data.as_deref(), Some("fixed"));
    }

    #[test]
    fn topology_formats() {
        let Command::Topology(args) = parse(&["topology", "--format", "mermaid"]) else {
            panic!("not topology")
        };
        assert_eq!(args.format, format::TopologyFormat::Mermaid);
        assert!(Cli::try_parse_from(["eventbus", "topology", "--format", "png"]).is_err());
    }
}
