//! `scenario`: `GET /users/{id}/products` from the scenario's query service, in both modes, next
//! to one bus query round trip. The harness starts the bus, user-, product- and order-service and
//! one query-service per mode, all on free ports with their databases in temporary directories.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::procs::{self, Programs, Server};
use crate::results::record;

/// Users in the scenario's fixture.
const USERS: u64 = 50;

/// The running scenario: keep it alive while measuring.
pub struct Scenario {
    _services: Vec<Server>,
    pub request_reply: SocketAddr,
    pub projection: SocketAddr,
}

pub async fn start(programs: &Programs, bus: &Server) -> Result<Scenario> {
    let url = bus.url();
    let mut services = Vec::new();
    for name in ["user-service", "product-service", "order-service"] {
        services.push(procs::start_service(programs, name, &url, None, &[]).await?);
    }
    let request_reply = SocketAddr::from(([127, 0, 0, 1], procs::free_port().await?));
    services.push(
        procs::start_service(
            programs,
            "query-service",
            &url,
            Some(request_reply),
            &["--mode", "request-reply"],
        )
        .await?,
    );
    let projection = SocketAddr::from(([127, 0, 0, 1], procs::free_port().await?));
    services.push(
        procs::start_service(
            programs,
            "query-service",
            &url,
            Some(projection),
            &["--mode", "projection"],
        )
        .await?,
    );
    let scenario = Scenario {
        _services: services,
        request_reply,
        projection,
    };
    scenario.wait_ready().await?;
    Ok(scenario)
}

impl Scenario {
    /// Until every user is answered in both modes and the projection has caught up.
    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ready().await.unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the scenario's services were not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn ready(&self) -> Result<bool> {
        let mut projection = Http::connect(self.projection).await?;
        let (status, body) = projection.get("/status").await?;
        let status_json: serde_json::Value = serde_json::from_slice(&body)?;
        if status != 200 || status_json["caught_up"] != true || status_json["lag"] != 0 {
            return Ok(false);
        }
        let mut request_reply = Http::connect(self.request_reply).await?;
        for user in 1..=USERS {
            let path = format!("/users/{user}/products");
            let (a, first) = request_reply.get(&path).await?;
            let (b, second) = projection.get(&path).await?;
            if a != 200 || b != 200 {
                return Ok(false);
            }
            let first: serde_json::Value = serde_json::from_slice(&first)?;
            let second: serde_json::Value = serde_json::from_slice(&second)?;
            if first["products"] != second["products"] {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Sequential GETs of `/users/{id}/products` for ids cycling over the fixture's users.
pub async fn measure(
    addr: SocketAddr,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    let mut http = Http::connect(addr).await?;
    let deadline = Instant::now() + limit;
    for i in 0..count {
        let path = format!("/users/{}/products", i % USERS + 1);
        let start = Instant::now();
        let (status, _) = http.get(&path).await?;
        record(histogram, start.elapsed());
        if status != 200 {
            bail!("GET {path}: status {status}");
        }
        if Instant::now() > deadline {
            break;
        }
    }
    Ok(())
}

/// A minimal HTTP/1.1 client on one kept-alive connection: enough for GETs that answer with a
/// Content-Length, without a client library's overhead in the numbers.
struct Http {
    stream: BufReader<TcpStream>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Result<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream: BufReader::new(stream),
        })
    }

    async fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .context("no status line")?
            .parse()?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}
