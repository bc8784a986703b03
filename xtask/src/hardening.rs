//! What `validate-deploy` checks in the DaemonSet beyond the schemas: not privileged,
//! no privilege escalation, a read-only root, every capability dropped but a known few,
//! each of those with its reason written next to it, a seccomp profile, and no mount
//! that propagates back to the host.
use serde_json::Value;

/// The capabilities the daemon may be given (README "Security model" says why).
const ALLOWED: [&str; 7] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
    "DAC_OVERRIDE",
];

/// Every way `yaml` (a DaemonSet) falls short; empty when it does not.
pub(crate) fn check(yaml: &str) -> Result<Vec<String>, String> {
    let ds: Value = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
    let pod = &ds["spec"]["template"]["spec"];
    let mut problems = Vec::new();
    let seccomp = |sc: &Value| sc["seccompProfile"]["type"].as_str().map(str::to_owned);
    let pod_seccomp = seccomp(&pod["securityContext"]);
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    if containers.is_empty() {
        problems.push("no containers".to_owned());
    }
    for c in containers
        .iter()
        .chain(pod["initContainers"].as_array().into_iter().flatten())
    {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        let mut problem = |what: String| problems.push(format!("container {name}: {what}"));
        if sc["privileged"].as_bool() == Some(true) {
            problem("privileged: true (list the capabilities it needs instead)".into());
        }
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
            problem("allowPrivilegeEscalation is not false".into());
        }
        if sc["readOnlyRootFilesystem"].as_bool() != Some(true) {
            problem("readOnlyRootFilesystem is not true".into());
        }
        match seccomp(sc).or_else(|| pod_seccomp.clone()).as_deref() {
            Some("RuntimeDefault" | "Localhost") => {}
            other => problem(format!(
                "seccompProfile is {other:?}, not RuntimeDefault or Localhost"
            )),
        }
        let caps = &sc["capabilities"];
        let drop: Vec<&str> = caps["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if drop != ["ALL"] {
            problem(format!("capabilities.drop is {drop:?}, not [ALL]"));
        }
        for cap in caps["add"].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or("?");
            if !ALLOWED.contains(&cap) {
                problem(format!(
                    "capability {cap} is not one the daemon needs ({})",
                    ALLOWED.join(", ")
                ));
            } else if !yaml
                .lines()
                .any(|l| l.trim().starts_with(&format!("# {cap}:")))
            {
                problem(format!(
                    "capability {cap} has no `# {cap}: why` comment next to it"
                ));
            }
        }
        for mount in c["volumeMounts"].as_array().into_iter().flatten() {
            if mount["mountPropagation"].as_str() == Some("Bidirectional") {
                problem(format!(
                    "volume {} is mounted Bidirectional (HostToContainer is enough)",
                    mount["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMONSET: &str = include_str!("../../deploy/daemonset.yaml");

    #[test]
    fn the_shipped_daemonset_passes() {
        assert_eq!(check(DAEMONSET).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn each_weakening_is_named() {
        let cases = [
            ("privileged: false", "privileged: true", "privileged: true"),
            (
                "allowPrivilegeEscalation: false",
                "allowPrivilegeEscalation: true",
                "allowPrivilegeEscalation",
            ),
            (
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
                "readOnlyRootFilesystem",
            ),
            ("type: RuntimeDefault", "type: Unconfined", "seccompProfile"),
            ("drop: [ALL]", "drop: [NET_RAW]", "capabilities.drop"),
            (
                "- SYS_PTRACE",
                "- SYS_PTRACE\n            - NET_RAW",
                "NET_RAW is not one",
            ),
            ("# SYS_PTRACE:", "# ptrace:", "SYS_PTRACE has no"),
            (
                "mountPropagation: HostToContainer",
                "mountPropagation: Bidirectional",
                "Bidirectional",
            ),
        ];
        for (from, to, want) in cases {
            assert!(DAEMONSET.contains(from), "{from}");
            let problems = check(&DAEMONSET.replacen(from, to, 1)).unwrap();
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{from} → {to}: {problems:?}"
            );
        }
    }
}
