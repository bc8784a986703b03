//! Admin HTTP endpoint: `/healthz` (alive), `/readyz` (serving, with the data path
//! attached and the first registry sync done), `/metrics` (Prometheus text: DNS, cache
//! and eBPF counters), `/debug/ndsz` (the name table as JSON, like Istio's).
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

use crate::{
    bpf::pinned,
    dns::{handler::Handler, metrics::Metrics},
    registry::Registry,
};

/// What the admin endpoint reports on.
pub struct AdminState {
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub handler: Arc<Handler>,
    pub registry: Arc<Registry>,
    pub pin_dir: PathBuf,
}

/// Binds the admin address (errors are reported before anything is attached).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on admin address {addr} (choose another --admin)"))
}

/// Serves requests until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let requests = tokio_util::task::TaskTracker::new();
    while let Some(accepted) = shutdown.run_until_cancelled(listener.accept()).await {
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let state = state.clone();
        requests.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &state)).await;
        });
    }
    requests.close();
    requests.wait().await;
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
    let content_type = if path.starts_with("/debug/") {
        "application/json"
    } else {
        "text/plain; version=0.0.4"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
        "/debug/ndsz" => ("200 OK", render_ndsz(state)),
        _ => ("404 Not Found", "not found\n".to_owned()),
    }
}

fn render_metrics(state: &AdminState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    state.metrics.render(&mut out, state.handler.cache_len());
    match pinned::read_stats(&state.pin_dir) {
        Ok(stats) => {
            out.push_str(
                "# HELP dnsproxy_ebpf_decisions_total Data-path decisions, summed over CPUs.\n",
            );
            out.push_str("# TYPE dnsproxy_ebpf_decisions_total counter\n");
            for (name, value) in stats {
                let _ = writeln!(
                    out,
                    "dnsproxy_ebpf_decisions_total{{decision=\"{name}\"}} {value}"
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "# eBPF counters unavailable: {e}");
        }
    }
    out
}

/// The name table: host → addresses (or alias), sources and alternative names.
fn render_ndsz(state: &AdminState) -> String {
    let table = state.registry.table();
    let dump = serde_json::json!({
        "clusterDomain": table.cluster_domain(),
        "hosts": table.dump(),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}
