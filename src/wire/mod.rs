//! Wire formats shared by server and trigger, sans-IO: the control frames of the TLS link and
//! the trigger packet (P3) the trigger injects.

pub mod control;
pub mod rewrite;
pub mod trigger_packet;
