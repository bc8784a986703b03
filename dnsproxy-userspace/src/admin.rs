//! Admin HTTP endpoint: `/healthz` (alive), `/readyz` (serving with the data path
//! attached), `/metrics` (Prometheus text: DNS counters and the eBPF counters).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{bpf::pinned, dns::metrics::Metrics};

/// What the admin endpoint reports on.
pub struct AdminState {
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub pin_dir: PathBuf,
}

/// Binds the admin address (errors are reported before anything is attached).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin address {addr} (choose another --admin)"))
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &state)).await;
        });
    }
}

async fn respond(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Read the request head; the body (none expected) is ignored.
    while n < buf.len() {
        let m = stream.read(&mut buf[n..]).await?;
        if m == 0 {
            break;
        }
        n += m;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = route(path, state);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

fn route(path: &str, state: &AdminState) -> (&'static str, String) {
    match path {
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/readyz" if state.ready.load(Ordering::Acquire) => ("200 OK", "ready\n".to_owned()),
        "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
        "/metrics" => ("200 OK", render_metrics(state)),
        _ => ("404 Not Found", "not found\n".to_owned()),
    }
}

fn render_metrics(state: &AdminState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    state.metrics.render(&mut out);
    match pinned::read_stats(&state.pin_dir) {
        Ok(stats) => {
            out.push_str("# HELP dnsproxy_ebpf_decisions_total Data-path decisions, summed over CPUs.\n");
            out.push_str("# TYPE dnsproxy_ebpf_decisions_total counter\n");
            for (name, value) in stats {
                let _ = writeln!(out, "dnsproxy_ebpf_decisions_total{{decision=\"{name}\"}} {value}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "# eBPF counters unavailable: {e}");
        }
    }
    out
}
