//! `devplug-agent sim`: writes a simulated device's control file atomically
//! (write to a temp file, then rename), so the agent never reads half a file.

use std::path::Path;

/// Errors of the sim subcommand.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Unknown state word.
    #[error("state {0:?} is not one of Healthy, Unhealthy, Unknown, Absent, Present")]
    State(String),
    /// A bad policy or device name.
    #[error("{0}")]
    Name(String),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Sets `device` of `policy` to `state`.
pub fn set(
    control: &Path,
    policy: &str,
    device: &str,
    state: &str,
    reason: Option<&str>,
) -> Result<(), SimError> {
    devplug_api::validate_device_id(device).map_err(SimError::Name)?;
    if policy.is_empty() || policy.contains('/') || policy.starts_with('.') {
        return Err(SimError::Name(format!("{policy:?} is not a policy name")));
    }
    let dir = control.join(policy);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let absent = dir.join(format!("{device}.absent"));
    let write = |name: &str, content: String| -> Result<(), SimError> {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).map_err(io(&tmp))?;
        let dst = dir.join(name);
        std::fs::rename(&tmp, &dst).map_err(io(&dst))
    };
    let reason = reason.unwrap_or("set by devplug-agent sim");
    match state {
        "Healthy" => write(device, "Healthy\n".into()),
        "Unhealthy" | "Unknown" => write(device, format!("{state}: {reason}\n")),
        "Absent" => write(&format!("{device}.absent"), String::new()),
        "Present" => match std::fs::remove_file(&absent) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&absent)(e)),
            _ => Ok(()),
        },
        other => Err(SimError::State(other.to_string())),
    }
}
