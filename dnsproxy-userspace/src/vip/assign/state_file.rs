//! The allocator's state file, `vips.json` (`{"hosts": {"<host>": <slot>, ...}}`,
//! one host a line): read strictly, salvaged line by line when damaged, and written
//! atomically (temporary file, fsync, rename, fsync of the directory), so that a crash
//! or a full disk never leaves a half-written file behind.
use std::{
    collections::{BTreeMap, HashSet},
    io::Write as _,
    path::Path,
};

use serde::{Deserialize, Serialize};

/// Slots run from 1 to this.
pub const SLOTS: u32 = 65534;

#[derive(Debug, Default, Deserialize)]
struct StateFile {
    /// host → slot.
    hosts: BTreeMap<String, u32>,
}

/// [`StateFile`] to write, borrowing the allocations.
#[derive(Serialize)]
struct StateFileRef<'a> {
    hosts: &'a BTreeMap<String, u32>,
}

/// What is wrong with a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It cannot be read.
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    /// It is not the JSON we write (truncated, or overwritten).
    #[error("cannot parse it")]
    Parse(#[source] serde_json::Error),
    /// A slot is outside the VIP range.
    #[error("the slot of {host} is out of range")]
    SlotOutOfRange { host: String },
    /// Two hosts hold the same slot.
    #[error("{host} and {other} hold the same slot")]
    SharedSlot { host: String, other: String },
}

/// A state file as read: the allocations it holds, and what was wrong with it (then
/// `hosts` is what could be salvaged).
#[derive(Debug, Default)]
pub struct Loaded {
    pub hosts: BTreeMap<String, u32>,
    pub damage: Option<StateError>,
}

/// Reads `path`; a missing file is an empty state.
pub fn read(path: &Path) -> Loaded {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::default(),
        Err(e) => {
            return Loaded {
                hosts: BTreeMap::new(),
                damage: Some(StateError::Read(e)),
            };
        }
    };
    match parse(&text) {
        Ok(hosts) => Loaded {
            hosts,
            damage: None,
        },
        Err(damage) => Loaded {
            hosts: salvage(&text),
            damage: Some(damage),
        },
    }
}

/// The allocations of a whole, valid state file.
pub fn parse(text: &str) -> Result<BTreeMap<String, u32>, StateError> {
    let hosts = serde_json::from_str::<StateFile>(text)
        .map_err(StateError::Parse)?
        .hosts;
    let mut owners: BTreeMap<u32, &String> = BTreeMap::new();
    for (host, slot) in &hosts {
        if !(1..=SLOTS).contains(slot) {
            return Err(StateError::SlotOutOfRange { host: host.clone() });
        }
        if let Some(other) = owners.insert(*slot, host) {
            return Err(StateError::SharedSlot {
                host: host.clone(),
                other: other.clone(),
            });
        }
    }
    Ok(hosts)
}

/// Every complete `"host": slot` line, with a slot in range that no earlier line
/// took: what a truncated or partly overwritten file still knows. A line is complete
/// when it ends with a comma or the next line closes the object; a cut-off last line
/// is not trusted (`12345` cut to `12` still reads as a slot).
pub fn salvage(text: &str) -> BTreeMap<String, u32> {
    let mut hosts = BTreeMap::new();
    let mut taken = HashSet::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let closed = lines
            .peek()
            .is_some_and(|next| next.trim_start().starts_with('}'));
        if !line.trim_end().ends_with(',') && !closed {
            continue;
        }
        let Some((host, slot)) = allocation_line(line) else {
            continue;
        };
        if (1..=SLOTS).contains(&slot) && !hosts.contains_key(&host) && taken.insert(slot) {
            hosts.insert(host, slot);
        }
    }
    hosts
}

/// `"host": 123,` → (host, 123).
fn allocation_line(line: &str) -> Option<(String, u32)> {
    let (key, value) = line.trim().trim_end_matches(',').split_once(':')?;
    let host: String = serde_json::from_str(key.trim()).ok()?;
    let slot = value.trim().parse().ok()?;
    let plausible = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._*".contains(&b));
    plausible.then_some((host, slot))
}

/// The state as text, one host a line (the file's and the cluster store's form).
pub fn encode(hosts: &BTreeMap<String, u32>) -> String {
    serde_json::to_string_pretty(&StateFileRef { hosts }).unwrap_or_default()
}

/// The temporary file a write goes through: one per process, since during a handoff
/// two daemons share the state directory.
fn temp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension(format!("json.{}.tmp", std::process::id()))
}

/// Writes `hosts` to `path` atomically and durably.
pub fn write(path: &Path, hosts: &BTreeMap<String, u32>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let bytes = encode(hosts).into_bytes();
    let tmp = temp_path(path);
    // A leftover of a crash is removed (unlink does not follow a link), and the file is
    // created new and never through a symbolic link: whatever sits at the name, the
    // state goes nowhere else.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?
    };
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(h, s)| ((*h).to_owned(), *s)).collect()
    }

    #[test]
    fn damaged_files_keep_what_they_still_hold() {
        struct Case {
            name: &'static str,
            text: &'static str,
            want: &'static [(&'static str, u32)],
            damaged: bool,
        }
        let cases = [
            Case {
                name: "whole",
                text: "{\n  \"hosts\": {\n    \"a.com\": 5,\n    \"b.com\": 9\n  }\n}",
                want: &[("a.com", 5), ("b.com", 9)],
                damaged: false,
            },
            Case {
                name: "truncated mid-line",
                text: "{\n  \"hosts\": {\n    \"a.com\": 5,\n    \"b.com\": 9,\n    \"c.co",
                want: &[("a.com", 5), ("b.com", 9)],
                damaged: true,
            },
            Case {
                name: "a cut-off number is not trusted",
                text: "{\n  \"hosts\": {\n    \"a.com\": 5,\n    \"b.com\": 123",
                want: &[("a.com", 5)],
                damaged: true,
            },
            Case {
                name: "garbage and an out-of-range slot",
                text: "{\n  \"hosts\": {\n    \"a.com\": 5,\n  @@@@\n    \"z.com\": 70000,\n    \"b.com\": 9\n  }\n",
                want: &[("a.com", 5), ("b.com", 9)],
                damaged: true,
            },
            Case {
                name: "a slot claimed twice keeps the first",
                text: "{\n  \"hosts\": {\n    \"a.com\": 5,\n    \"b.com\": 5\n  }\n}",
                want: &[("a.com", 5)],
                damaged: true,
            },
            Case {
                name: "empty file",
                text: "",
                want: &[],
                damaged: true,
            },
        ];
        for c in cases {
            let loaded = match parse(c.text) {
                Ok(hosts) => Loaded {
                    hosts,
                    damage: None,
                },
                Err(e) => Loaded {
                    hosts: salvage(c.text),
                    damage: Some(e),
                },
            };
            assert_eq!(loaded.hosts, hosts(c.want), "{}", c.name);
            assert_eq!(loaded.damage.is_some(), c.damaged, "{}", c.name);
        }
    }

    #[test]
    fn written_files_read_back_whole() {
        let dir = std::env::temp_dir().join(format!("vip-state-{}", std::process::id()));
        let path = dir.join("vips.json");
        let want = hosts(&[("a.com", 5), ("*.b.com", 7), ("c-d.example", 65534)]);
        write(&path, &want).unwrap();
        let loaded = read(&path);
        assert!(loaded.damage.is_none(), "{:?}", loaded.damage);
        assert_eq!(loaded.hosts, want);
        // What we write salvages completely, line by line.
        assert_eq!(salvage(&std::fs::read_to_string(&path).unwrap()), want);
        assert!(!temp_path(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            read(&path).hosts.is_empty(),
            "a missing file is an empty state"
        );
    }
}
