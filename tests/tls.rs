//! TLS on the bus's listeners, with certificates made at test time: the SDK over TLS with a
//! custom CA, mutual TLS, no silent plaintext either way, reloading certificates, the handshake
//! deadline, the admin listener over HTTPS, and SIGHUP on the real binary.

mod bus_process;
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tls::{Pki, TlsFiles};
use common::{eventually, TestBus};
use eventbus::config::ServerConfig;
use eventbus::sdk::Client;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn tls_bus(files: &TlsFiles) -> TestBus {
    TestBus::start_tls(ServerConfig {
        tls: Some(files.config()),
        shutdown_grace: Duration::from_secs(5),
        handshake_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await
}

/// A client of `bus` over TLS trusting `ca`.
async fn client(bus: &TestBus, ca: &Pki) -> eventbus::sdk::Result<Client> {
    Client::builder(bus.https_url())
        .tls_ca_pem(ca.ca_pem())
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
}

/// Publishes one event and returns its sequence, the error if the call (or connect) fails.
async fn publish_once(builder: eventbus::sdk::ClientBuilder) -> eventbus::sdk::Result<u64> {
    let client = builder.connect().await?;
    tokio::time::timeout(WAIT, client.publish("tls.check", "x"))
        .await
        .expect("the publish answers in time")
}

#[tokio::test]
async fn publish_and_subscribe_over_tls_with_a_custom_ca() {
    let pki = Pki::new("test CA");
    let files = TlsFiles::new(&pki, None);
    let bus = tls_bus(&files).await;
    let client = client(&bus, &pki).await.unwrap();
    let mut subscription = client.subscribe("orders.*").await.unwrap();
    let sequence = client.publish("orders.created", "one").await.unwrap();
    let event = tokio::time::timeout(WAIT, subscription.next_event())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((event.sequence, &event.data[..]), (sequence, &b"one"[..]));

    // A client that does not trust the CA does not get in.
    let untrusted =
        publish_once(Client::builder(bus.https_url()).connect_timeout(Duration::from_secs(3)))
            .await;
    assert!(untrusted.is_err(), "{untrusted:?}");
    bus.stop(WAIT).await;
}

/// Runs the `eventbus` CLI with `args` (no `EVENTBUS_*` from the test's environment).
fn cli(args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"));
    for (key, _) in std::env::vars() {
        if key.starts_with("EVENTBUS_") {
            command.env_remove(key);
        }
    }
    command.args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_tls_with_a_custom_ca_and_never_plaintext_to_https() {
    let pki = Pki::new("cli CA");
    let files = TlsFiles::new(&pki, None);
    let ca = files.path("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let ca = ca.display().to_string();
    let bus = tls_bus(&files).await;
    let url = bus.https_url();

    let published = cli(&[
        "publish", "tls.cli", "hello", "--server", &url, "--tls-ca", &ca,
    ]);
    assert!(published.status.success(), "{published:?}");
    let topics = cli(&["topics", "--json", "--server", &url, "--tls-ca", &ca]);
    assert!(topics.status.success(), "{topics:?}");
    let topics = String::from_utf8_lossy(&topics.stdout);
    assert!(topics.contains("tls.cli"), "{topics}");

    // Without the CA the certificate is not trusted; an http:// URL to the TLS port is not
    // answered in plaintext. Both fail with one clear error and a non-zero exit.
    for args in [
        vec!["topics", "--server", url.as_str()],
        vec![
            "topics",
            "--server",
            &url.replacen("https://", "http://", 1),
        ],
    ] {
        let refused = cli(&args);
        assert!(!refused.status.success(), "{args:?} got in: {refused:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn a_plaintext_client_fails_on_a_tls_port_and_https_never_falls_back_to_plaintext() {
    let pki = Pki::new("test CA");
    let files = TlsFiles::new(&pki, None);
    let bus = tls_bus(&files).await;
    let plaintext =
        publish_once(Client::builder(bus.url()).connect_timeout(Duration::from_secs(3)))
            .await
            .unwrap_err();
    // The bus tells a plaintext client why, in a status its retry loops do not retry.
    let why = format!("{plaintext}");
    assert!(why.contains("requires TLS: use an https:// URL"), "{why}");
    assert_eq!(plaintext.code(), tonic::Code::FailedPrecondition, "{why}");
    assert_eq!(plaintext.reason(), Some("tls-required"), "{why}");

    let plain_bus = TestBus::start().await;
    let https_to_plain = publish_once(
        Client::builder(format!("https://{}", plain_bus.addr))
            .tls_ca_pem(pki.ca_pem())
            .connect_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap_err();
    // It failed connecting (TLS), not with an answer of the bus over plaintext.
    assert!(
        matches!(https_to_plain, eventbus::sdk::Error::Connect { .. })
            || https_to_plain
                .status()
                .is_some_and(|s| s.code() == tonic::Code::Unavailable),
        "{https_to_plain:?}"
    );
    bus.stop(WAIT).await;
    plain_bus.stop(WAIT).await;
}

#[tokio::test]
async fn mutual_tls_lets_in_certificates_of_the_client_ca_and_no_other() {
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let stranger_pki = Pki::new("another CA");
    let files = TlsFiles::new(&server_pki, Some(&client_pki));
    let bus = tls_bus(&files).await;
    let with = |pair: &common::tls::Pair| {
        Client::builder(bus.https_url())
            .tls_ca_pem(server_pki.ca_pem())
            .tls_client_cert_pem(pair.cert.clone(), pair.key.clone())
            .connect_timeout(Duration::from_secs(3))
    };
    let good = client_pki.client("order-service", "Acme");
    publish_once(with(&good))
        .await
        .expect("a certificate of the client CA");
    let stranger = stranger_pki.client("order-service", "Acme");
    let refused = publish_once(with(&stranger)).await;
    assert!(refused.is_err(), "a certificate of another CA: {refused:?}");
    // No certificate at all is let in: authentication, not TLS, decides about it.
    publish_once(
        Client::builder(bus.https_url())
            .tls_ca_pem(server_pki.ca_pem())
            .connect_timeout(Duration::from_secs(3)),
    )
    .await
    .expect("no client certificate");
    bus.stop(WAIT).await;
}

/// Log lines, collected for the test to read.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The bus runs on this test's thread (the default test runtime), so a scoped subscriber sees
/// its logs: the verified client certificate's subject, as requests see it.
#[tokio::test]
async fn the_client_certificate_subject_reaches_the_connection() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("eventbus=debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let files = TlsFiles::new(&server_pki, Some(&client_pki));
    let bus = tls_bus(&files).await;
    let pair = client_pki.client("order-service", "Acme");
    publish_once(
        Client::builder(bus.https_url())
            .tls_ca_pem(server_pki.ca_pem())
            .tls_client_cert_pem(pair.cert, pair.key),
    )
    .await
    .unwrap();
    let text = logs.text();
    assert!(
        text.lines()
            .any(|line| line.contains("client certificate verified")
                && line.contains("subject=CN=order-service,O=Acme")),
        "{text}"
    );
    assert!(text.contains("mutual TLS on"), "{text}");
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn changed_files_are_reloaded_for_new_connections_and_bad_ones_refused() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("eventbus=info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let old_pki = Pki::new("old CA");
    let files = TlsFiles::new(&old_pki, None);
    let bus = tls_bus(&files).await;
    let old_client = client(&bus, &old_pki).await.unwrap();
    old_client.publish("tls.before", "x").await.unwrap();

    // A new CA's certificate replaces the files: new connections get it.
    let new_pki = Pki::new("new CA");
    files.write_server(&new_pki.server());
    eventually("a client trusting the new CA gets in", WAIT, || async {
        client(&bus, &new_pki)
            .await
            .ok()?
            .publish("tls.after", "x")
            .await
            .ok()
    })
    .await;
    // The connection made before goes on with the old certificate.
    old_client.publish("tls.old-connection", "x").await.unwrap();
    let stale = publish_once(
        Client::builder(bus.https_url())
            .tls_ca_pem(old_pki.ca_pem())
            .connect_timeout(Duration::from_secs(3)),
    )
    .await;
    assert!(
        stale.is_err(),
        "a new connection trusting only the old CA: {stale:?}"
    );

    // A bad certificate file is refused, logged, and the certificate in force stays.
    common::tls::replace(&files.path("cert.pem"), b"not a certificate");
    eventually("the bad file is logged", WAIT, || async {
        logs.text()
            .contains("TLS certificates not reloaded")
            .then_some(())
    })
    .await;
    let text = logs.text();
    assert!(text.contains("--tls-cert"), "{text}");
    client(&bus, &new_pki)
        .await
        .unwrap()
        .publish("tls.still", "x")
        .await
        .expect("the certificate in force stays");
    bus.stop(WAIT).await;
}

/// A TLS client for `addr` trusting `ca`.
async fn raw_tls(
    addr: std::net::SocketAddr,
    ca: &Pki,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_admin_listener_serves_metrics_over_tls() {
    let pki = Pki::new("test CA");
    let files = TlsFiles::new(&pki, None);
    let bus = tls_bus(&files).await;
    let mut stream = raw_tls(bus.admin_addr.unwrap(), &pki, b"http/1.1").await;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bus\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .ok();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("eventbus_"), "{response}");
    // Plaintext HTTP to it gets no answer.
    let mut plain = tokio::net::TcpStream::connect(bus.admin_addr.unwrap())
        .await
        .unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bus\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("the connection is closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("requires TLS"),
        "{answer}"
    );
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn a_client_that_never_handshakes_is_closed_at_the_deadline_and_blocks_no_one() {
    let pki = Pki::new("test CA");
    let files = TlsFiles::new(&pki, None);
    let bus = tls_bus(&files).await;
    let mut silent = tokio::net::TcpStream::connect(bus.addr).await.unwrap();
    // Another client is served while the silent one holds its handshake open.
    client(&bus, &pki)
        .await
        .unwrap()
        .publish("tls.meanwhile", "x")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the silent connection is closed by the handshake deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    bus.stop(WAIT).await;
}

/// SIGHUP on the real process: the files are read again (the watcher would find them changed
/// within a second too; the log line names which it was).
#[tokio::test]
async fn sighup_reloads_the_certificates_of_the_running_binary() {
    let old_pki = Pki::new("old CA");
    let files = TlsFiles::new(&old_pki, None);
    let cert = files.path("cert.pem");
    let key = files.path("key.pem");
    let bus = bus_process::BusProcess::start(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(
        bus.logged("TLS on, mutual TLS off").len(),
        1,
        "{:?}",
        bus.logs()
    );
    let url = format!("https://{}", bus.addr);
    publish_once(Client::builder(url.clone()).tls_ca_pem(old_pki.ca_pem()))
        .await
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &bus.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually("the SIGHUP reload is logged", WAIT, || async {
        bus.logs()
            .iter()
            .any(|line| {
                line["fields"]["message"] == "TLS certificates reloaded"
                    && line["fields"]["why"] == "SIGHUP"
            })
            .then_some(())
    })
    .await;
    // The process lives on and serves.
    publish_once(Client::builder(url).tls_ca_pem(old_pki.ca_pem()))
        .await
        .unwrap();
}
