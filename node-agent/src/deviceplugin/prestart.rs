//! The policy's device-preparation command, run for PreStartContainer.

use std::process::Stdio;
use std::time::Duration;

/// Why the command failed; the message names the devices.
#[derive(Debug, thiserror::Error)]
pub enum PreStartError {
    /// The program could not be started.
    #[error("preStart for devices {ids}: cannot run {program}: {source}")]
    Spawn {
        /// Device IDs.
        ids: String,
        /// The program.
        program: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program is not in the agent's image.
    #[error(
        "preStart for devices {ids}: {program} does not exist in the agent's image; the stock image is distroless, so spec.agent.image must name an image that contains it"
    )]
    Missing {
        /// Device IDs.
        ids: String,
        /// The program.
        program: String,
    },
    /// It exited unsuccessfully.
    #[error("preStart for devices {ids} failed ({status}): {stderr}")]
    Failed {
        /// Device IDs.
        ids: String,
        /// Exit status.
        status: String,
        /// Last part of its standard error.
        stderr: String,
    },
    /// It ran past its time limit and was killed.
    #[error("preStart for devices {ids} did not finish within {secs} s")]
    Timeout {
        /// Device IDs.
        ids: String,
        /// The limit.
        secs: u64,
    },
}

/// Runs `command` with the physical device IDs appended as arguments and in
/// `DEVPLUG_DEVICE_IDS`; kills it at `timeout`.
pub async fn run(
    command: &[String],
    ids: &[String],
    timeout: Duration,
) -> Result<(), PreStartError> {
    let joined = ids.join(",");
    let Some((program, args)) = command.split_first() else {
        return Ok(());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .args(ids)
        .env("DEVPLUG_DEVICE_IDS", &joined)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PreStartError::Missing {
                    ids: joined.clone(),
                    program: program.clone(),
                }
            } else {
                PreStartError::Spawn {
                    ids: joined.clone(),
                    program: program.clone(),
                    source,
                }
            }
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(PreStartError::Spawn {
                ids: joined,
                program: program.clone(),
                source,
            });
        }
        Err(_) => {
            return Err(PreStartError::Timeout {
                ids: joined,
                secs: timeout.as_secs(),
            });
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let tail: String = text
        .trim()
        .chars()
        .rev()
        .take(512)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(PreStartError::Failed {
        ids: joined,
        status: out.status.to_string(),
        stderr: tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "prestart".into(),
        ]
    }

    #[tokio::test]
    async fn success_gets_ids_as_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo \"$@|$DEVPLUG_DEVICE_IDS\" > {}", out.display());
        run(
            &sh(&script),
            &["a".into(), "b".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap().trim(), "a b|a,b");
    }

    /// The shipped image has no shell and no tools: a program that is not
    /// there says so, and how to fix it.
    #[tokio::test]
    async fn a_program_missing_from_the_image_says_what_to_do() {
        let e = run(
            &["/nonexistent/reset-gpu".into()],
            &["gpu7".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("gpu7") && e.contains("/nonexistent/reset-gpu"),
            "{e}"
        );
        assert!(e.contains("spec.agent.image"), "{e}");
    }

    #[tokio::test]
    async fn failure_and_timeout_name_the_devices() {
        let e = run(
            &sh("echo reset failed >&2; exit 3"),
            &["gpu7".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("gpu7") && e.contains("reset failed") && e.contains("3"),
            "{e}"
        );
        let e = run(&sh("sleep 5"), &["gpu8".into()], Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu8") && e.contains("did not finish"), "{e}");
        let e = run(
            &["/nonexistent/prog".into()],
            &["gpu9".into()],
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("gpu9") && e.contains("/nonexistent/prog"), "{e}");
    }
}
