//! The request path's import layers, checked: a module of `dns/` may use only modules
//! of lower layers, so the path reads top to bottom (transports → handler → table,
//! cache, merging → forwarder) and nothing below calls back up. Test code is left out
//! (it may build a handler to drive a lower layer).

/// Lowest layer first. A module may use the modules of every lower layer, never one of
/// its own layer or above.
const LAYERS: &[&[&str]] = &[
    // What every layer names: the counters, what is asked, DNS over TCP frames.
    &["metrics", "question", "framing"],
    // Who asks (with the pod's own counters).
    &["client"],
    // The table's answers, the cache, the in-flight bounds, the forwarder, and the kept
    // encoded answers of the fast path.
    &["local", "cache", "inflight", "forwarder", "fast"],
    // The upstream path: cache, then the bounds and merging, then the forwarder.
    &["upstream"],
    // One query: admission, then the table, then the upstream path.
    &["handler"],
    // Transports, which call the handler and the fast path and are never called back.
    &["batch", "workers", "tcp", "receive_queue"],
    &["server"],
];

/// Every module's source without its tests, by module name.
const SOURCES: &[(&str, &str)] = &[
    ("client", include_str!("client.rs")),
    ("question", include_str!("question.rs")),
    ("metrics", include_str!("metrics.rs")),
    ("framing", include_str!("framing.rs")),
    ("local", include_str!("local.rs")),
    ("cache", include_str!("cache.rs")),
    ("inflight", include_str!("inflight.rs")),
    ("forwarder", include_str!("forwarder.rs")),
    ("fast", include_str!("fast/mod.rs")),
    ("upstream", include_str!("upstream.rs")),
    ("handler", include_str!("handler/mod.rs")),
    ("batch", include_str!("batch.rs")),
    ("workers", include_str!("workers.rs")),
    ("tcp", include_str!("tcp.rs")),
    ("receive_queue", include_str!("receive_queue.rs")),
    ("server", include_str!("server.rs")),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The `dns` modules `source` uses: `super::m`, `crate::dns::m`, and the names in a
/// `use super::{...}` group (for `fast/` and `handler/`, whose `super` is `dns` too).
fn uses(source: &str) -> Vec<&'static str> {
    let code: String = source
        .split("#[cfg(test)]")
        .next()
        .unwrap_or(source)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let code = code.as_str();
    let mut found = Vec::new();
    for (module, _) in SOURCES {
        let direct = [format!("super::{module}"), format!("crate::dns::{module}")];
        let used = direct.iter().any(|p| {
            code.match_indices(p.as_str()).any(|(at, _)| {
                !code[at + p.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            })
        }) || grouped(code).iter().any(|name| name == module);
        if used {
            found.push(*module);
        }
    }
    found
}

/// The first path segment of each item of every `use super::{...}` group.
fn grouped(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in code.match_indices("use super::{") {
        let mut depth = 0;
        let mut item = String::new();
        let mut at_start = true;
        for c in code[at + "use super::".len()..].chars() {
            match c {
                '{' => {
                    depth += 1;
                    at_start = true;
                    item.clear();
                    if depth > 1 {
                        at_start = false;
                    }
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => {
                    at_start = true;
                    item.clear();
                }
                c if depth == 1 && at_start => {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        names.push(std::mem::take(&mut item));
                        at_start = false;
                    }
                }
                _ => {}
            }
        }
    }
    names
}

#[test]
fn every_module_has_a_layer() {
    for (module, _) in SOURCES {
        assert!(layer_of(module).is_some(), "{module} has no layer");
    }
}

#[test]
fn layers_only_look_down() {
    let mut wrong = Vec::new();
    for (module, source) in SOURCES {
        let own = layer_of(module).expect("every module has a layer");
        for used in uses(source) {
            let theirs = layer_of(used).expect("every module has a layer");
            if theirs >= own {
                wrong.push(format!(
                    "{module} (layer {own}) uses {used} (layer {theirs})"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
}

#[test]
fn the_checker_sees_grouped_and_direct_imports() {
    let source = "use super::{\n    EDNS_PAYLOAD,\n    cache::{self, Cache},\n    handler::Handler,\n};\nfn f() { crate::dns::tcp::x(); super::fast::y(); }\n#[cfg(test)]\nmod tests { use super::server; }";
    let mut found = uses(source);
    found.sort_unstable();
    assert_eq!(found, ["cache", "fast", "handler", "tcp"]);
}
