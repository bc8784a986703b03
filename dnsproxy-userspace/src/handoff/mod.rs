//! Upgrades without a gap. A daemon that starts while another one runs for the same
//! state directory takes the listening sockets over instead of opening new ones, so
//! the kernel never sees the DNS port closed and the data path never fails open:
//!
//! 1. the successor connects to `<state-dir>/handoff.sock` and says hello;
//! 2. the predecessor freezes its pod listeners (none opened or closed from now on)
//!    and sends, with `SCM_RIGHTS`, the pin directory's lock, its admin and debug
//!    listeners, its local listener (local mode) and every pod's listeners with the
//!    pod's UID, network namespace and netns cookie (node mode);
//! 3. the successor adopts the pinned data path, syncs, serves on those sockets
//!    (both daemons answer for a moment: the sockets are the same), and says stop;
//! 4. the predecessor answers done, stops reading, answers what it has in flight and
//!    goes, leaving pins, policy entries and the socket path to its successor.
//!
//! Fallbacks, each counted: no answer within a bound, a predecessor that has crashed
//! (its socket refuses), or one for another pin directory or port: the successor
//! starts as before (adopting pins in node mode), and pods fail open in between.
pub mod trust;
pub mod wire;

pub use trust::Refusal;

use std::{
    collections::HashMap,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "handoff.sock";

/// How long each step of the exchange may take before the successor gives up (hello
/// answered, descriptors received, stop acknowledged).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// A listener's sockets as descriptors: UDP, then TCP.
#[derive(Debug, Default)]
pub struct Sockets {
    pub udp: Vec<OwnedFd>,
    pub tcp: Vec<OwnedFd>,
}

impl Sockets {
    fn raw(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.udp.iter().chain(&self.tcp).map(AsRawFd::as_raw_fd)
    }

    fn counts(&self) -> Counts {
        Counts {
            udp: self.udp.len(),
            tcp: self.tcp.len(),
        }
    }

    fn take(counts: Counts, fds: &mut impl Iterator<Item = OwnedFd>) -> Sockets {
        Sockets {
            udp: fds.by_ref().take(counts.udp).collect(),
            tcp: fds.by_ref().take(counts.tcp).collect(),
        }
    }
}

/// One pod's listener as handed over.
#[derive(Debug)]
pub struct PodSockets {
    /// Device and inode of the network namespace the sockets live in.
    pub netns: (u64, u64),
    pub cookie: u64,
    pub sockets: Sockets,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Counts {
    udp: usize,
    tcp: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodDescription {
    uid: String,
    netns: (u64, u64),
    cookie: u64,
    sockets: Counts,
}

/// What precedes the descriptors. They follow in this order: the pin directory's lock,
/// the admin listener, the debug listener, the local listener, each pod's.
#[derive(Debug, Serialize, Deserialize)]
pub struct Description {
    pid: u32,
    pin_dir: PathBuf,
    listen_port: u16,
    local: Option<Counts>,
    pods: Vec<PodDescription>,
}

impl Description {
    /// How many descriptors follow, once the counts are checked against their bounds
    /// (nothing is allocated for a count that is not).
    fn descriptors(&self) -> std::io::Result<usize> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        if self.pods.len() > trust::MAX_PODS {
            return Err(invalid(format!(
                "{} pods described, more than {}",
                self.pods.len(),
                trust::MAX_PODS
            )));
        }
        let n = |c: &Counts| {
            if c.udp > trust::MAX_SOCKETS || c.tcp > trust::MAX_SOCKETS {
                return Err(invalid(format!(
                    "a listener of {} UDP and {} TCP sockets, more than {} of a kind",
                    c.udp,
                    c.tcp,
                    trust::MAX_SOCKETS
                )));
            }
            Ok(c.udp + c.tcp)
        };
        let mut total = 3 + self.local.as_ref().map(n).transpose()?.unwrap_or(0);
        for pod in &self.pods {
            total += n(&pod.sockets)?;
        }
        Ok(total)
    }

    /// Each descriptor as [`Inventory::send`] orders them, with the kind and network
    /// namespace it must have.
    fn expected(&self, own: (u64, u64)) -> Vec<(String, trust::Kind, (u64, u64))> {
        use trust::Kind::{Tcp, Udp};
        let listener = |out: &mut Vec<_>, who: &str, c: &Counts, netns| {
            out.extend((0..c.udp).map(|i| (format!("{who}'s UDP socket {i}"), Udp, netns)));
            out.extend((0..c.tcp).map(|i| (format!("{who}'s TCP socket {i}"), Tcp, netns)));
        };
        let mut out = vec![
            ("the admin listener".to_owned(), Tcp, own),
            ("the debug listener".to_owned(), Tcp, own),
        ];
        if let Some(local) = &self.local {
            listener(&mut out, "the local listener", local, own);
        }
        for pod in &self.pods {
            listener(
                &mut out,
                &format!("pod {}", pod.uid),
                &pod.sockets,
                pod.netns,
            );
        }
        out
    }
}

/// A predecessor's description and how many descriptors follow it (bounded), or why
/// it is refused. Public for the fuzz target of the wire messages.
pub fn parse_description(bytes: &[u8]) -> std::io::Result<(Description, usize)> {
    let d: Description = serde_json::from_slice(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let n = d.descriptors()?;
    Ok((d, n))
}

/// Checks what a predecessor handed against its description: the pin directory's lock
/// first, then every socket's kind and network namespace.
fn check_handed(description: &Description, fds: &[OwnedFd], pin_dir: &Path) -> Result<(), String> {
    use std::os::fd::AsFd as _;
    let (lock, sockets) = fds.split_first().ok_or("no descriptors")?;
    trust::check_lock(lock.as_fd(), pin_dir)?;
    let own = trust::own_netns().map_err(|e| format!("this process's network namespace: {e}"))?;
    let expected = description.expected(own);
    if expected.len() != sockets.len() {
        return Err(format!(
            "{} sockets described, {} handed",
            expected.len(),
            sockets.len()
        ));
    }
    for ((what, kind, netns), fd) in expected.into_iter().zip(sockets) {
        trust::check_descriptor(fd.as_fd(), kind, netns).map_err(|why| format!("{what}: {why}"))?;
    }
    Ok(())
}

// === the predecessor's side ===

/// What a running daemon can hand over: kept as descriptors of its own (duplicates of
/// the sockets it serves), pods added and removed as their listeners open and close.
pub struct Inventory {
    pin_dir: PathBuf,
    listen_port: u16,
    lock: OwnedFd,
    admin: [OwnedFd; 2],
    local: Option<Sockets>,
    pods: Mutex<HashMap<String, PodSockets>>,
    /// Set while a successor holds a copy: pod listeners are neither opened nor closed.
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Inventory {
    pub fn new(
        pin_dir: PathBuf,
        listen_port: u16,
        lock: OwnedFd,
        admin: [OwnedFd; 2],
        local: Option<Sockets>,
    ) -> Self {
        Inventory {
            pin_dir,
            listen_port,
            lock,
            admin,
            local,
            pods: Mutex::new(HashMap::new()),
            frozen: tokio::sync::watch::Sender::new(false),
        }
    }

    /// A pod's listener opened (its own descriptors for the same sockets).
    pub fn add_pod(&self, uid: &str, pod: PodSockets) {
        self.pods
            .lock()
            .expect("inventory lock")
            .insert(uid.to_owned(), pod);
    }

    /// A pod's listener closed: its sockets must close with it.
    pub fn remove_pod(&self, uid: &str) {
        self.pods.lock().expect("inventory lock").remove(uid);
    }

    /// True while a handoff is under way: pod listeners stay as they are.
    pub fn frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    /// A receiver that wakes up when a handoff starts or ends (what waited on it can
    /// go ahead when it ends without a successor).
    pub fn subscribe_frozen(&self) -> tokio::sync::watch::Receiver<bool> {
        self.frozen.subscribe()
    }

    /// Sends the description and the descriptors (the pod table locked meanwhile, so
    /// no descriptor closes while it is being sent).
    fn send(&self, stream: &mut UnixStream) -> std::io::Result<usize> {
        let pods = self.pods.lock().expect("inventory lock");
        let description = Description {
            pid: std::process::id(),
            pin_dir: self.pin_dir.clone(),
            listen_port: self.listen_port,
            local: self.local.as_ref().map(Sockets::counts),
            pods: pods
                .iter()
                .map(|(uid, p)| PodDescription {
                    uid: uid.clone(),
                    netns: p.netns,
                    cookie: p.cookie,
                    sockets: p.sockets.counts(),
                })
                .collect(),
        };
        let mut fds = vec![self.lock.as_raw_fd()];
        fds.extend(self.admin.iter().map(AsRawFd::as_raw_fd));
        fds.extend(self.local.iter().flat_map(Sockets::raw));
        for pod in &description.pods {
            fds.extend(pods[&pod.uid].sockets.raw());
        }
        let bytes = serde_json::to_vec(&description).map_err(std::io::Error::other)?;
        wire::send(stream, &bytes, &fds)?;
        Ok(description.pods.len())
    }
}

/// How one request of a successor ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Given {
    /// It serves now: stop.
    TakenOver { successor: u32 },
    /// Not a dnsproxy of ours: nothing was read from it or sent to it.
    Refused(Refusal),
    /// It went away or did not say stop in time: carry on.
    Abandoned,
}

/// Serves one successor on a blocking stream: hello, the sockets, then (within
/// `stop_wait`, the time it may need to sync) stop, answered with done.
pub fn give(
    stream: &mut UnixStream,
    inventory: &Inventory,
    stop_wait: Duration,
) -> std::io::Result<Given> {
    if let Err(refusal) = trust::check_peer(stream) {
        return Ok(Given::Refused(refusal));
    }
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    wire::expect_word(stream, wire::HELLO)?;
    let successor = wire::read_u32(stream)?;
    inventory.frozen.send_replace(true);
    let outcome = (|| {
        let pods = inventory.send(stream)?;
        tracing::info!(
            successor,
            pods,
            "handoff: sockets sent, waiting for the successor to serve them"
        );
        stream.set_read_timeout(Some(stop_wait))?;
        if wire::expect_word(stream, wire::STOP).is_err() {
            return Ok(Given::Abandoned);
        }
        std::io::Write::write_all(stream, wire::DONE)?;
        Ok(Given::TakenOver { successor })
    })();
    if outcome.as_ref().map_or(true, |g| *g == Given::Abandoned) {
        inventory.frozen.send_replace(false);
    }
    outcome
}

/// The socket a daemon listens on for its successor: bound under a temporary name and
/// renamed into place, so a successor replaces it atomically.
pub struct Giver {
    pub listener: tokio::net::UnixListener,
    path: PathBuf,
    inode: u64,
}

impl Giver {
    /// Binds `<state_dir>/handoff.sock` (call inside the runtime).
    pub fn bind(state_dir: &Path) -> std::io::Result<Giver> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(SOCKET_NAME);
        let tmp = state_dir.join(format!("{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let inode = std::fs::metadata(&tmp)?.ino();
        std::fs::rename(&tmp, &path)?;
        Ok(Giver {
            listener,
            path,
            inode,
        })
    }

    /// Removes the socket path, unless a successor has put its own there.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves successors on `giver` until one takes over (then `handed_over` is
/// cancelled) or `shutdown`; one at a time.
pub async fn serve(
    giver: Giver,
    inventory: std::sync::Arc<Inventory>,
    stop_wait: Duration,
    (handed_over, counters): (tokio_util::sync::CancellationToken, Counters),
    shutdown: tokio_util::sync::CancellationToken,
) {
    while let Some(accepted) = shutdown.run_until_cancelled(giver.listener.accept()).await {
        let stream = match accepted.and_then(|(s, _)| s.into_std()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handoff socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let inventory = std::sync::Arc::clone(&inventory);
        let given = tokio::task::spawn_blocking(move || {
            let mut stream = stream;
            stream.set_nonblocking(false)?;
            give(&mut stream, &inventory, stop_wait)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match given {
            Ok(Given::TakenOver { successor }) => {
                tracing::info!(
                    successor,
                    "handoff: the successor serves the sockets; stopping"
                );
                counters.handoff("given");
                handed_over.cancel();
                // Another successor queued meanwhile is refused at once (not left to
                // time out and take this daemon for a hung one). The socket path is the
                // successor's now; the task ends with the daemon.
                drop(giver.listener);
                shutdown.cancelled().await;
                return;
            }
            Ok(Given::Refused(refusal)) => {
                tracing::warn!(
                    reason = refusal.reason(),
                    "handoff: refused a peer that is not this daemon's program: {refusal}"
                );
                counters.refused(&refusal);
            }
            Ok(Given::Abandoned) => {
                tracing::warn!(
                    "handoff: the successor went away or did not serve in time; carrying on"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "handoff: exchange with a successor failed; carrying on");
            }
        }
    }
    giver.remove();
}

// === the successor's side ===

/// Why a successor started without a handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// The socket is there but nobody listens: the predecessor crashed.
    Crashed,
    /// The predecessor did not answer within [`STEP_TIMEOUT`]; its pid, as the socket
    /// reports its listener's owner.
    Timeout { pid: Option<u32> },
    /// It serves another pin directory or port: not ours to take.
    Mismatch(String),
    /// What listens is not this daemon's program (nothing was sent to it).
    Untrusted(Refusal),
    /// The exchange broke.
    Failed(String),
}

impl Fallback {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Fallback::Crashed => "crashed",
            Fallback::Timeout { .. } => "timeout",
            Fallback::Mismatch(_) => "mismatch",
            Fallback::Untrusted(_) => "untrusted",
            Fallback::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::Crashed => {
                f.write_str("the previous daemon is gone (its handoff socket refuses)")
            }
            Fallback::Timeout { pid } => write!(
                f,
                "the previous daemon (pid {pid:?}) did not answer within {STEP_TIMEOUT:?}"
            ),
            Fallback::Untrusted(refusal) => {
                write!(f, "the handoff socket's listener is not trusted: {refusal}")
            }
            Fallback::Mismatch(why) | Fallback::Failed(why) => f.write_str(why),
        }
    }
}

/// What a successor got (each part taken out as it is used).
pub struct Taken {
    stream: UnixStream,
    pub predecessor: u32,
    pub lock: Option<OwnedFd>,
    pub admin: Option<[OwnedFd; 2]>,
    pub local: Option<Sockets>,
    /// By pod UID.
    pub pods: HashMap<String, PodSockets>,
}

/// How a start began.
pub enum Start {
    /// No daemon ran with this state directory.
    Fresh,
    Taken(Taken),
    Fallback(Fallback),
}

/// Asks a running daemon for its sockets (blocking; each step within [`STEP_TIMEOUT`]).
pub fn take(state_dir: &Path, pin_dir: &Path, listen_port: u16, node: bool) -> Start {
    let path = state_dir.join(SOCKET_NAME);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Start::Fresh,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Start::Fallback(Fallback::Crashed);
        }
        Err(e) => {
            return Start::Fallback(Fallback::Failed(format!(
                "connecting to {}: {e}",
                path.display()
            )));
        }
    };
    match exchange(&mut stream, pin_dir, listen_port, node) {
        Ok((description, fds)) => Start::Taken(Taken::assemble(stream, description, fds)),
        Err(fallback) => Start::Fallback(fallback),
    }
}

fn exchange(
    stream: &mut UnixStream,
    pin_dir: &Path,
    listen_port: u16,
    node: bool,
) -> Result<(Description, Vec<OwnedFd>), Fallback> {
    let pid = match trust::check_peer(stream) {
        Ok(pid) => Some(pid),
        Err(refusal) => return Err(Fallback::Untrusted(refusal)),
    };
    let broke = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Fallback::Timeout { pid },
        _ => Fallback::Failed(format!("handoff exchange: {e}")),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(broke)?;
    stream
        .set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(broke)?;
    wire::write_word(stream, wire::HELLO, std::process::id()).map_err(broke)?;
    let (description, fds) = wire::receive(stream, parse_description).map_err(broke)?;
    if description.pin_dir != pin_dir || description.listen_port != listen_port {
        return Err(Fallback::Mismatch(format!(
            "the running daemon (pid {}) serves pin directory {} and port {}, not {} and {listen_port}",
            description.pid,
            description.pin_dir.display(),
            description.listen_port,
            pin_dir.display()
        )));
    }
    if description.local.is_some() == node {
        return Err(Fallback::Mismatch(format!(
            "the running daemon (pid {}) runs in the other mode",
            description.pid
        )));
    }
    check_handed(&description, &fds, pin_dir).map_err(|why| {
        Fallback::Failed(format!(
            "the running daemon (pid {}) handed a descriptor that is not what it described: {why}",
            description.pid
        ))
    })?;
    Ok((description, fds))
}

impl Taken {
    fn assemble(stream: UnixStream, description: Description, fds: Vec<OwnedFd>) -> Taken {
        let mut fds = fds.into_iter();
        let mut next = || fds.next().expect("counted descriptors");
        let lock = next();
        let admin = [next(), next()];
        let local = description.local.map(|c| Sockets::take(c, &mut fds));
        let pods = description
            .pods
            .into_iter()
            .map(|p| {
                let sockets = Sockets::take(p.sockets, &mut fds);
                let pod = PodSockets {
                    netns: p.netns,
                    cookie: p.cookie,
                    sockets,
                };
                (p.uid, pod)
            })
            .collect();
        Taken {
            stream,
            predecessor: description.pid,
            lock: Some(lock),
            admin: Some(admin),
            local,
            pods,
        }
    }

    /// Tells the predecessor to stop, now that this daemon serves; waits for its done.
    pub fn finish(mut self) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.stream, wire::STOP)?;
        wire::expect_word(&mut self.stream, wire::DONE)
    }
}

/// A predecessor that did not answer still holds the pin directory's lock and the
/// listening ports: it is killed (`pid`: the owner of the socket it listens on), so
/// that this daemon can start as after a crash. Only a process named dnsproxy is
/// killed; true when it was.
pub fn kill_unresponsive(pid: u32) -> bool {
    if pid == 0 || pid == std::process::id() {
        return false;
    }
    // A pidfd first: the checks and the kill then concern one process, even if the pid
    // were reused meanwhile.
    let Ok(process) = crate::pidfd::Pidfd::open(pid) else {
        return false;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "dnsproxy" || !process.is_alive() {
        return false;
    }
    process.signal(libc::SIGKILL);
    // Its sockets are closed once every one of its threads has exited, which is when
    // the pidfd turns readable (its main thread alone may be a zombie earlier).
    process.wait_exited(5000);
    true
}

// === metrics ===

type Labels = [(&'static str, &'static str); 1];

/// `dnsproxy_handoffs_total{role="received"|"given"}`,
/// `dnsproxy_handoff_fallbacks_total{reason}` and `dnsproxy_handoff_refused_total{reason}`.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    handoffs: Family<Labels, Counter>,
    fallbacks: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
}

impl Counters {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        for role in ["received", "given"] {
            let _ = self.handoffs.get_or_create(&[("role", role)]);
        }
        for reason in ["crashed", "timeout", "mismatch", "untrusted", "failed"] {
            let _ = self.fallbacks.get_or_create(&[("reason", reason)]);
        }
        for reason in ["credentials", "uid", "executable"] {
            let _ = self.refused.get_or_create(&[("reason", reason)]);
        }
        registry.register(
            "dnsproxy_handoffs",
            "Listening sockets handed to a successor (given) or taken from a predecessor (received).",
            self.handoffs.clone(),
        );
        registry.register(
            "dnsproxy_handoff_fallbacks",
            "Starts that found a previous daemon but could not take its sockets over (then pods failed open until the new listeners).",
            self.fallbacks.clone(),
        );
        registry.register(
            "dnsproxy_handoff_refused",
            "Connections to the handoff socket refused because the peer is not this daemon's program run by its user.",
            self.refused.clone(),
        );
    }

    pub fn refused(&self, refusal: &Refusal) {
        self.refused
            .get_or_create(&[("reason", refusal.reason())])
            .inc();
    }

    pub fn handoff(&self, role: &'static str) {
        self.handoffs.get_or_create(&[("role", role)]).inc();
    }

    pub fn fallback(&self, fallback: &Fallback) {
        self.fallbacks
            .get_or_create(&[("reason", fallback.reason())])
            .inc();
    }
}

#[cfg(test)]
mod tests;
