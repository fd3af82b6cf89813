//! beckon: reach IP cameras behind NATs nobody can reconfigure, by the trigger method of
//! patent CN103491346A. See `docs/architecture.md` for how the modules map to the patent.

pub mod catalog;
pub mod config;
pub mod heap;
pub mod hostnet;
pub mod link;
pub mod rate_limit;
pub mod server;
pub mod signals;
pub mod splice;
pub mod status;
pub mod tls;
pub mod trigger;
pub mod wire;
