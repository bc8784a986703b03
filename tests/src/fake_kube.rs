//! A fake Kubernetes API server for the node-mode tests: real HTTP on a loopback
//! address inside the test's node netns, speaking the list/watch protocol that
//! kube-rs's real client uses: lists with a resourceVersion, chunked watch streams of
//! ADDED/MODIFIED/DELETED events from a resourceVersion, BOOKMARK events, and
//! `410 Gone` (reason Expired) for a resourceVersion older than the last compaction,
//! which makes the client relist. Field selectors (`spec.nodeName=`, `metadata.name=`)
//! and label selectors (`k=v`, `k!=v`, `k`, `!k`) are honoured; an object whose update
//! moves it into or out of a watch's selection reaches that watch as ADDED or DELETED,
//! as the API server's watch cache does.
//!
//! Built to hold a cluster: 100,000 Pods and hundreds of updates a second. History is
//! kept per collection, bounded (the oldest events are compacted away), and a watch
//! finds where it left off by binary search.
use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Netns, bind_in};

/// A collection the server serves: its URL path and its list kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    ServiceEntries,
    Namespaces,
    Pods,
    WorkloadEntries,
    ConfigMaps,
}

impl Resource {
    const ALL: [Resource; 7] = [
        Resource::ConfigMaps,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::ServiceEntries,
        Resource::Namespaces,
        Resource::Pods,
        Resource::WorkloadEntries,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::ServiceEntries => "/apis/networking.istio.io/v1/serviceentries",
            Resource::Namespaces => "/api/v1/namespaces",
            Resource::Pods => "/api/v1/pods",
            Resource::WorkloadEntries => "/apis/networking.istio.io/v1/workloadentries",
            Resource::ConfigMaps => "/api/v1/configmaps",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Namespaces | Resource::Pods | Resource::ConfigMaps => {
                "v1"
            }
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ServiceEntries | Resource::WorkloadEntries => "networking.istio.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::ServiceEntries => "ServiceEntry",
            Resource::WorkloadEntries => "WorkloadEntry",
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::ConfigMaps => "ConfigMap",
        }
    }
}

/// Events kept per collection; older ones are compacted away (a watch that needs them
/// gets 410 Gone and relists, as with etcd's compaction).
const HISTORY: usize = 50_000;

/// One change, as watches replay it: the object after it, and before it (to tell a
/// watch that the object moved into or out of its selection).
struct Event {
    rv: u64,
    kind: &'static str,
    obj: Arc<Value>,
    old: Option<Arc<Value>>,
}

/// A collection's recent history.
#[derive(Default)]
struct History {
    events: VecDeque<Event>,
    /// Events at or below this resourceVersion are gone.
    compacted_below: u64,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches asking for an older resourceVersion get 410 Gone.
    compacted_below: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    objects: BTreeMap<(Resource, String, String), Arc<Value>>,
    history: BTreeMap<Resource, History>,
    lists: usize,
    watches: usize,
    gone: usize,
    conflicts: usize,
    /// Writes (PUT, POST) received, and those refused as invalid (422).
    writes: usize,
    invalid: usize,
    /// GETs of one object.
    reads: usize,
    /// Every HTTP request, and the first lines of the first of them (method, path and
    /// query).
    requests: usize,
    log: Vec<String>,
    stopped: bool,
}

impl State {
    /// Records a change and wakes the watches.
    fn record(
        &mut self,
        resource: Resource,
        kind: &'static str,
        obj: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        let history = self.history.entry(resource).or_default();
        history.events.push_back(Event {
            rv: self.rv,
            kind,
            obj,
            old,
        });
        while history.events.len() > HISTORY {
            if let Some(gone) = history.events.pop_front() {
                history.compacted_below = gone.rv;
            }
        }
    }
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// How the server behaves.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How often an open watch gets a BOOKMARK (the API server sends one about every
    /// minute; the tests' default is quicker, so relists are exercised).
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_every: Duration::from_millis(500),
        }
    }
}

/// Writes objects into a running server, from any thread.
#[derive(Clone)]
pub struct Writer(Shared);

impl Writer {
    /// Creates or replaces each of `objs` (one lock, one wake-up of the watches).
    pub fn apply_many(&self, resource: Resource, objs: impl IntoIterator<Item = Value>) {
        let (lock, cv) = &*self.0;
        let mut st = lock.lock().unwrap();
        for obj in objs {
            store_locked(&mut st, resource, obj);
        }
        cv.notify_all();
    }
}

/// The server; stops when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Shared,
    thread: Option<thread::JoinHandle<()>>,
}

/// A kubeconfig for the server at `addr` (plain HTTP, no credentials).
fn kubeconfig_at(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test}}\n\
         current-context: fake\n"
    )
}

fn key(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_owned(),
        meta["name"].as_str().unwrap_or("").to_owned(),
    )
}

impl FakeKube {
    /// Serves on 127.0.0.1 (an ephemeral port) inside `netns`.
    pub fn start(netns: &Netns) -> Self {
        Self::start_with(netns, Options::default())
    }

    /// [`FakeKube::start`] with `options`.
    pub fn start_with(netns: &Netns, options: Options) -> Self {
        // Every address of the netns: its loopback, and a link another test netns (a
        // second "node") reaches it over.
        let (_udp, listener) = bind_in(netns, "0.0.0.0:0".parse().unwrap());
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
        listener.set_nonblocking(true).unwrap();
        let shared: Shared = Arc::default();
        let s = Arc::clone(&shared);
        let thread = thread::spawn(move || {
            loop {
                if s.0.lock().unwrap().stopped {
                    return;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = Arc::clone(&s);
                        thread::spawn(move || {
                            let _ = serve(stream, &s, options);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeKube {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        kubeconfig_at(self.addr)
    }

    /// A kubeconfig reaching this server at `ip` (from a netns linked to its own).
    pub fn kubeconfig_via(&self, ip: std::net::IpAddr) -> String {
        kubeconfig_at(SocketAddr::new(ip, self.addr.port()))
    }

    /// Creates or replaces an object (ADDED / MODIFIED), stamping apiVersion, kind and
    /// resourceVersion.
    pub fn apply(&self, resource: Resource, obj: Value) {
        store(&self.shared, resource, obj);
    }

    /// [`FakeKube::apply`] of many objects at once (one lock, one wake-up).
    pub fn apply_many(&self, resource: Resource, objs: impl IntoIterator<Item = Value>) {
        self.writer().apply_many(resource, objs);
    }

    /// A handle that writes objects from another thread.
    pub fn writer(&self) -> Writer {
        Writer(Arc::clone(&self.shared))
    }

    /// An object as stored (with its resourceVersion).
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.0.lock().unwrap();
        st.objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .map(|o| Value::clone(o))
    }

    /// HTTP requests served so far (lists, watches, reads and writes).
    pub fn requests_total(&self) -> usize {
        self.shared.0.lock().unwrap().requests
    }

    /// The requests served so far (the first 10,000): `METHOD path?query`.
    pub fn request_log(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().log.clone()
    }

    /// Writes that lost a race (409 Conflict, or `AlreadyExists`) so far.
    pub fn conflicts(&self) -> usize {
        self.shared.0.lock().unwrap().conflicts
    }

    /// (writes received, writes refused as invalid: a ConfigMap over 1 MiB) so far.
    pub fn writes(&self) -> (usize, usize) {
        let st = self.shared.0.lock().unwrap();
        (st.writes, st.invalid)
    }

    /// GETs of one object so far.
    pub fn reads(&self) -> usize {
        self.shared.0.lock().unwrap().reads
    }

    /// Deletes an object (DELETED).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        let Some(old) = st
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        st.rv += 1;
        let mut obj = Value::clone(&old);
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.record(resource, "DELETED", Arc::new(obj), Some(old));
        cv.notify_all();
    }

    /// Forgets history and ends every watch: clients that reconnect with their last
    /// resourceVersion get 410 Gone and must relist.
    pub fn compact(&self) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        st.compacted_below = st.rv;
        st.history.clear();
        st.epoch += 1;
        cv.notify_all();
    }

    /// (lists, watches, 410 responses) served so far.
    pub fn requests(&self) -> (usize, usize, usize) {
        let st = self.shared.0.lock().unwrap();
        (st.lists, st.watches, st.gone)
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            lock.lock().unwrap().stopped = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Stores `obj` as the API server would: apiVersion, kind and a new resourceVersion
/// stamped, an ADDED or MODIFIED event; returns it as stored.
fn store(shared: &Shared, resource: Resource, obj: Value) -> Arc<Value> {
    let (lock, cv) = &**shared;
    let mut st = lock.lock().unwrap();
    let stored = store_locked(&mut st, resource, obj);
    cv.notify_all();
    stored
}

fn store_locked(st: &mut State, resource: Resource, mut obj: Value) -> Arc<Value> {
    st.rv += 1;
    obj["apiVersion"] = json!(resource.api_version());
    obj["kind"] = json!(resource.kind());
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let (ns, name) = key(&obj);
    let obj = Arc::new(obj);
    let old = st.objects.insert((resource, ns, name), Arc::clone(&obj));
    let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
    st.record(resource, kind, Arc::clone(&obj), old);
    obj
}

/// What a list or watch selects: fields, labels, a namespace.
#[derive(Default)]
struct Filter {
    fields: Option<String>,
    labels: Option<String>,
    namespace: Option<String>,
}

impl Filter {
    fn of(params: &BTreeMap<String, String>, namespace: Option<String>) -> Self {
        Filter {
            fields: params.get("fieldSelector").cloned(),
            labels: params.get("labelSelector").cloned(),
            namespace,
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        selected(obj, self.fields.as_deref())
            && labelled(obj, self.labels.as_deref())
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
    }

    /// How `event` reaches a watch with this filter: as it is, as ADDED or DELETED
    /// when the object moved into or out of the selection, or not at all.
    fn transition(&self, event: &Event) -> Option<&'static str> {
        let now = self.matches(&event.obj);
        let before = event.old.as_ref().is_some_and(|o| self.matches(o));
        match (event.kind, before, now) {
            ("DELETED", true, _) | (_, true, false) => Some("DELETED"),
            ("DELETED", false, _) | (_, false, false) => None,
            (_, false, true) => Some("ADDED"),
            (_, true, true) => Some("MODIFIED"),
        }
    }
}

/// `k=v`, `k==v`, `k!=v`, `k` (exists) and `!k` (absent) terms, all of them.
fn labelled(obj: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                let v = v.trim_start_matches('=');
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels.get(k.trim()).is_none()
            } else {
                labels.get(term).is_some()
            }
        })
}

/// `spec.nodeName=X` and `metadata.name=X` selection.
fn selected(obj: &Value, field_selector: Option<&str>) -> bool {
    let Some(sel) = field_selector else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some(("spec.nodeName", want)) => obj["spec"]["nodeName"].as_str() == Some(want),
        Some(("metadata.name", want)) => obj["metadata"]["name"].as_str() == Some(want),
        _ => true,
    })
}

fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

/// Counts a write; the 422 the API server gives when it is invalid: a ConfigMap whose
/// data is over 1 MiB.
fn invalid(shared: &Shared, resource: Resource, obj: &Value) -> Option<Value> {
    let mut st = shared.0.lock().unwrap();
    st.writes += 1;
    if resource != Resource::ConfigMaps {
        return None;
    }
    let size: usize = ["data", "binaryData"]
        .iter()
        .filter_map(|field| obj[*field].as_object())
        .flat_map(|m| m.iter())
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size <= 1 << 20 {
        return None;
    }
    st.invalid += 1;
    Some(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("ConfigMap is invalid: []: Too long: must have at most 1048576 bytes ({size})"),
                "reason": "Invalid", "code": 422}),
    )
}

fn conflict(reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": 409})
}

/// One request: method, path, query parameters and body.
struct Request {
    method: String,
    path: String,
    params: BTreeMap<String, String>,
    body: Option<Value>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(None);
    }
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("GET").to_owned();
    let target = words.next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        params,
        body: serde_json::from_slice(&body).ok(),
    }))
}

/// `/api/v1/namespaces/NS/configmaps[/NAME]` → (the collection's cluster-wide path,
/// namespace, name).
fn namespaced(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.split('/').collect();
    let Some(at) = parts.iter().position(|p| *p == "namespaces") else {
        return (path.to_owned(), None, None);
    };
    if parts.len() < at + 3 {
        return (path.to_owned(), None, None);
    }
    let collection = [&parts[..at], &parts[at + 2..at + 3]].concat().join("/");
    let name = parts.get(at + 3).map(|n| (*n).to_owned());
    (collection, Some(parts[at + 1].to_owned()), name)
}

fn serve(stream: TcpStream, shared: &Shared, options: Options) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    while let Some(req) = read_request(&mut reader)? {
        {
            let mut st = shared.0.lock().unwrap();
            st.requests += 1;
            if st.log.len() < 10_000 {
                let query: Vec<String> =
                    req.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let line = format!("{} {}?{}", req.method, req.path, query.join("&"));
                st.log.push(line);
            }
        }
        let (collection, namespace, name) = namespaced(&req.path);
        let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == collection) else {
            respond(
                &mut stream,
                "404 Not Found",
                &not_found(&format!("the requested resource {}", req.path)),
            )?;
            return Ok(());
        };
        if let (Some(ns), Some(name)) = (&namespace, &name) {
            one_object(&mut stream, shared, resource, ns, name, &req)?;
            continue;
        }
        if req.method == "POST" {
            let mut obj = req.body.clone().unwrap_or_default();
            if let Some(status) = invalid(shared, resource, &obj) {
                respond(&mut stream, "422 Unprocessable Entity", &status)?;
                continue;
            }
            obj["metadata"]["namespace"] = json!(namespace.clone().unwrap_or_default());
            let (ns, name) = key(&obj);
            let exists =
                shared
                    .0
                    .lock()
                    .unwrap()
                    .objects
                    .contains_key(&(resource, ns, name.clone()));
            if exists {
                shared.0.lock().unwrap().conflicts += 1;
                respond(
                    &mut stream,
                    "409 Conflict",
                    &conflict("AlreadyExists", &format!("{name} already exists")),
                )?;
            } else {
                let stored = store(shared, resource, obj);
                respond(&mut stream, "201 Created", &stored)?;
            }
            continue;
        }
        let filter = Filter::of(&req.params, namespace);
        if !matches!(
            req.params.get("watch").map(String::as_str),
            Some("true" | "1")
        ) {
            list(&mut stream, shared, resource, &filter)?;
            continue;
        }
        return watch(stream, shared, resource, &req.params, &filter, options);
    }
    Ok(())
}

/// A list of the collection's objects `filter` selects, at the current
/// resourceVersion (written as it is read: no copy of the objects).
fn list(
    stream: &mut TcpStream,
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
) -> std::io::Result<()> {
    let (items, rv) = {
        let mut st = shared.0.lock().unwrap();
        st.lists += 1;
        let lo = (resource, String::new(), String::new());
        let items: Vec<Arc<Value>> = st
            .objects
            .range(lo..)
            .take_while(|((r, _, _), _)| *r == resource)
            .filter(|(_, o)| filter.matches(o))
            .map(|(_, o)| Arc::clone(o))
            .collect();
        (items, st.rv)
    };
    let mut body = format!(
        "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rv}\"}},\"items\":[",
        resource.api_version(),
        resource.kind()
    );
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item.to_string());
    }
    body.push_str("]}");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// GET or PUT of one object; a PUT whose resourceVersion is not the stored one gets
/// 409 Conflict, as the API server's optimistic concurrency does.
fn one_object(
    stream: &mut TcpStream,
    shared: &Shared,
    resource: Resource,
    ns: &str,
    name: &str,
    req: &Request,
) -> std::io::Result<()> {
    let k = (resource, ns.to_owned(), name.to_owned());
    let current = {
        let mut st = shared.0.lock().unwrap();
        if req.method == "GET" {
            st.reads += 1;
        }
        st.objects.get(&k).cloned()
    };
    match (req.method.as_str(), current) {
        ("GET", Some(obj)) => respond(stream, "200 OK", &obj),
        ("PUT", Some(obj)) => {
            let mut new = req.body.clone().unwrap_or_default();
            if new["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] {
                shared.0.lock().unwrap().conflicts += 1;
                let message = format!(
                    "Operation cannot be fulfilled on {name}: the object has been modified"
                );
                return respond(stream, "409 Conflict", &conflict("Conflict", &message));
            }
            if let Some(status) = invalid(shared, resource, &new) {
                return respond(stream, "422 Unprocessable Entity", &status);
            }
            new["metadata"]["namespace"] = json!(ns);
            let stored = store(shared, resource, new);
            respond(stream, "200 OK", &stored)
        }
        _ => respond(
            stream,
            "404 Not Found",
            &not_found(&format!("{} \"{name}\"", resource.kind())),
        ),
    }
}

fn watch(
    mut stream: TcpStream,
    shared: &Shared,
    resource: Resource,
    params: &BTreeMap<String, String>,
    filter: &Filter,
    options: Options,
) -> std::io::Result<()> {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        params
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290)
            .min(290),
    );
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let (lock, cv) = &**shared;
    let mut st = lock.lock().unwrap();
    st.watches += 1;
    let compacted = st
        .history
        .get(&resource)
        .map_or(0, |h| h.compacted_below)
        .max(st.compacted_below);
    if from < compacted {
        st.gone += 1;
        drop(st);
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                          "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
        chunk(&mut stream, &gone)?;
        return write!(stream, "0\r\n\r\n");
    }
    let epoch = st.epoch;
    let started = Instant::now();
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        if st.stopped || st.epoch != epoch || started.elapsed() > timeout {
            drop(st);
            return write!(stream, "0\r\n\r\n");
        }
        // The events after the last one seen, found by binary search.
        let mut pending: Vec<(&'static str, Arc<Value>)> = Vec::new();
        if let Some(history) = st.history.get(&resource) {
            let start = history.events.partition_point(|e| e.rv <= sent);
            for event in history.events.range(start..) {
                if let Some(kind) = filter.transition(event) {
                    pending.push((kind, Arc::clone(&event.obj)));
                }
                sent = event.rv;
            }
        }
        let current = st.rv;
        drop(st);
        for (kind, obj) in pending {
            let line = format!("{{\"type\":\"{kind}\",\"object\":{obj}}}\n");
            write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
        }
        stream.flush()?;
        if bookmarks && last_bookmark.elapsed() > options.bookmark_every {
            let mark = json!({"type": "BOOKMARK", "object": {"kind": resource.kind(), "apiVersion": resource.api_version(),
                              "metadata": {"resourceVersion": current.to_string()}}});
            chunk(&mut stream, &mark)?;
            sent = sent.max(current);
            last_bookmark = Instant::now();
        }
        st = lock.lock().unwrap();
        if st.rv == current {
            st = cv.wait_timeout(st, Duration::from_millis(250)).unwrap().0;
        }
    }
}
