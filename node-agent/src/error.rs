//! Why the agent could not start or stopped.

use std::path::PathBuf;

use devplug_api::LoadError;

use crate::devices::sources::SourceError;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Neither `--config` nor `--policy`.
    #[error("no configuration: pass --config FILE (standalone) or --policy NAME (cluster mode)")]
    NoConfig,
    /// The config file cannot be read.
    #[error("reading {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid policy YAML.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LoadError,
    },
    /// A source cannot be built.
    #[error("policy {policy}: {source}")]
    Source {
        /// Policy name.
        policy: String,
        /// What is wrong.
        #[source]
        source: SourceError,
    },
    /// A socket or directory cannot be set up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// Where.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// No API server configuration in cluster mode.
    #[error("cluster mode: {0}")]
    Kube(#[source] kube::Error),
    /// A bad flag value.
    #[error("{0}")]
    Flag(String),
}
