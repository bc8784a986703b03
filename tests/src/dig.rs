//! Reading `dig`'s output.
use std::process::Output;

use crate::stdout;

/// The addresses in dig's ANSWER section (A/AAAA records), in order.
pub fn dig_answers(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && (f[3] == "A" || f[3] == "AAAA")).then(|| f[4].to_owned())
        })
        .collect()
}

/// dig's `;; SERVER:` line.
pub fn dig_server(out: &Output) -> String {
    stdout(out)
        .lines()
        .find(|l| l.starts_with(";; SERVER:"))
        .unwrap_or("")
        .to_owned()
}
