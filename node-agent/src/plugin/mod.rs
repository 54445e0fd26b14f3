//! One served policy, independent of the kubelet API that serves it: the
//! state its fronts, the admin server and the metrics share ([`state`]),
//! and its life from discovery to stop ([`lifecycle`]).

pub mod lifecycle;
pub mod state;

pub use lifecycle::{Host, Plugin};
pub use state::{PluginState, StreamGuard, Streams};
