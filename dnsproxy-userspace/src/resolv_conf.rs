//! The nameservers and the search list of a resolv.conf file.
use std::{net::IpAddr, path::Path};

/// Errors reading resolv.conf.
#[derive(Debug, thiserror::Error)]
pub enum ResolvConfError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file lists no usable nameserver.
    #[error("{path} lists no nameserver; pass --dns-server")]
    NoNameserver { path: String },
}

/// Nameserver addresses in file order (scoped IPv6 suffixes like `%eth0` are dropped).
pub fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?.trim();
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            addr.split('%').next()?.parse().ok()
        })
        .collect()
}

/// Most search domains kept (glibc's own bound since 2.26).
pub const MAX_SEARCH: usize = 32;

/// The search list: the last `search` or `domain` line's domains, as the resolver
/// reads them (lowercase, no trailing dot, no empty or over-long names), at most
/// [`MAX_SEARCH`].
pub fn parse_search(text: &str) -> Vec<String> {
    let mut search = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if !matches!(words.next(), Some("search" | "domain")) {
            continue;
        }
        search = words
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty() && d.len() <= 253)
            .take(MAX_SEARCH)
            .collect();
    }
    search
}

/// Reads `path` and returns its nameservers, or an error if there are none.
pub fn read_nameservers(path: &Path) -> Result<Vec<IpAddr>, ResolvConfError> {
    let text = std::fs::read_to_string(path).map_err(|source| ResolvConfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let servers = parse_nameservers(&text);
    if servers.is_empty() {
        return Err(ResolvConfError::NoNameserver {
            path: path.display().to_string(),
        });
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order() {
        let text = "# comment\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver fe80::1%eth0 # scoped\nnameserver bogus\noptions ndots:5\n\
                    nameserver fd00::10\n";
        let got: Vec<String> = parse_nameservers(text)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.96.0.10", "fe80::1", "fd00::10"]);
    }

    #[test]
    fn the_last_search_line_wins_lowercased_and_bounded() {
        let text = "search a.example\nnameserver 10.96.0.10\n\
                    search Default.svc.cluster.local. svc.cluster.local cluster.local ; x\n\
                    options ndots:5\n";
        assert_eq!(
            parse_search(text),
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert!(parse_search("nameserver 10.0.0.1\n").is_empty());
        let many = format!("search {}\n", vec!["x.example"; 40].join(" "));
        assert_eq!(parse_search(&many).len(), MAX_SEARCH);
    }

    #[test]
    fn empty_is_an_error() {
        let dir = std::env::temp_dir().join(format!("resolv-test-{}", std::process::id()));
        std::fs::write(&dir, "search x\n").unwrap();
        let err = read_nameservers(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.contains("lists no nameserver"), "{err}");
    }
}
