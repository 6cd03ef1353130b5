//! screener: an SMTP zombie blocker.
//!
//! The daemon screens new SMTP clients the way Postfix's postscreen does and
//! hands good ones to the real MTA; verdicts on bad ones go into kernel maps
//! that an XDP program reads, so a bot's next packets are dropped at the NIC.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dnsbl;
pub mod duration;
pub mod import;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod screen;
pub mod smtp;
pub mod store;
pub mod verdict;
pub mod xdp;

/// The compiled eBPF objects (built by `build.rs`).
pub mod ebpf_objects {
    include!(concat!(env!("OUT_DIR"), "/ebpf_objects.rs"));
}
