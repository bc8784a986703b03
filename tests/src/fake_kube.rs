//! A fake Kubernetes API server for the node-mode tests: real HTTP on a loopback
//! address inside the test's node netns, speaking the list/watch protocol that
//! kube-rs's real client uses: lists with a resourceVersion, chunked watch streams of
//! ADDED/MODIFIED/DELETED events from a resourceVersion, BOOKMARK events, and
//! `410 Gone` (reason Expired) for a resourceVersion older than the last compaction,
//! which makes the client relist. Field selectors `spec.nodeName=` are honoured.
use std::{
    collections::BTreeMap,
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

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches asking for an older resourceVersion get 410 Gone.
    compacted_below: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    events: Vec<(u64, Resource, &'static str, Value)>,
    lists: usize,
    watches: usize,
    gone: usize,
    conflicts: usize,
    /// Writes (PUT, POST) received, and those refused as invalid (422).
    writes: usize,
    invalid: usize,
    /// GETs of one object.
    reads: usize,
    stopped: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

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
                            let _ = serve(stream, &s);
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

    /// An object as stored (with its resourceVersion).
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.0.lock().unwrap();
        st.objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .cloned()
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
        let Some(mut obj) = st
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, resource, "DELETED", obj));
        cv.notify_all();
    }

    /// Forgets history and ends every watch: clients that reconnect with their last
    /// resourceVersion get 410 Gone and must relist.
    pub fn compact(&self) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        st.compacted_below = st.rv;
        st.events.clear();
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
fn store(shared: &Shared, resource: Resource, mut obj: Value) -> Value {
    let (lock, cv) = &**shared;
    let mut st = lock.lock().unwrap();
    st.rv += 1;
    let rv = st.rv;
    obj["apiVersion"] = json!(resource.api_version());
    obj["kind"] = json!(resource.kind());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let (ns, name) = key(&obj);
    let kind = if st
        .objects
        .insert((resource, ns, name), obj.clone())
        .is_some()
    {
        "MODIFIED"
    } else {
        "ADDED"
    };
    st.events.push((rv, resource, kind, obj.clone()));
    cv.notify_all();
    obj
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

fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    while let Some(req) = read_request(&mut reader)? {
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
        let fields = req.params.get("fieldSelector").map(String::as_str);
        let in_namespace = |o: &Value| {
            namespace
                .as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
        };
        if !matches!(
            req.params.get("watch").map(String::as_str),
            Some("true" | "1")
        ) {
            let (items, rv) = {
                let mut st = shared.0.lock().unwrap();
                st.lists += 1;
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| {
                        *r == resource && selected(o, fields) && in_namespace(o)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (items, st.rv)
            };
            let list = json!({"apiVersion": resource.api_version(), "kind": format!("{}List", resource.kind()),
                              "metadata": {"resourceVersion": rv.to_string()}, "items": items});
            respond(&mut stream, "200 OK", &list)?;
            continue;
        }
        return watch(stream, shared, resource, &req.params, fields);
    }
    Ok(())
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
    fields: Option<&str>,
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
    if from < st.compacted_below {
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
        let pending: Vec<(u64, &'static str, Value)> = st
            .events
            .iter()
            .filter(|(rv, r, _, o)| *rv > sent && *r == resource && selected(o, fields))
            .map(|(rv, _, t, o)| (*rv, *t, o.clone()))
            .collect();
        let current = st.rv;
        drop(st);
        for (rv, kind, obj) in pending {
            chunk(&mut stream, &json!({"type": kind, "object": obj}))?;
            sent = rv;
        }
        if bookmarks && last_bookmark.elapsed() > Duration::from_millis(500) {
            let mark = json!({"type": "BOOKMARK", "object": {"kind": resource.kind(), "apiVersion": resource.api_version(),
                              "metadata": {"resourceVersion": current.to_string()}}});
            chunk(&mut stream, &mark)?;
            sent = sent.max(current);
            last_bookmark = Instant::now();
        }
        st = lock.lock().unwrap();
        st = cv.wait_timeout(st, Duration::from_millis(250)).unwrap().0;
    }
}
