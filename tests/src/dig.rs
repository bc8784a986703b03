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

/// dig's reply code (`NOERROR`, `NXDOMAIN`, ...), from its `->>HEADER<<-` line.
pub fn dig_status(out: &Output) -> String {
    stdout(out)
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("")
        .to_owned()
}

/// The owner names of dig's AUTHORITY section.
pub fn dig_authority(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .skip_while(|l| !l.starts_with(";; AUTHORITY SECTION:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next().map(ToOwned::to_owned))
        .collect()
}
