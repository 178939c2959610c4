//! Loopback ports for test servers.
//!
//! A port found free by binding it and letting go is still up for grabs
//! until the server binds it. The kernel hands ports of its ephemeral range
//! (`ip_local_port_range`) to every outgoing connection, so a port picked
//! there can be taken by any client in the meantime, or later, before a
//! server restarts on it (CI saw weed die with "bind: address already in
//! use" on a gRPC port). Ports here are picked below that range, scattered,
//! and never handed out twice in one process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{bail, Result};

/// Ports handed out in this process.
static RESERVED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Where picked ports start: above the well-known and registered ports
/// that local services tend to use.
const LOW: u32 = 10_000;

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn free(p: u32) -> bool {
    u16::try_from(p).is_ok_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// Reserves a base port `B` such that `B + o` for every `o` in `offsets`
/// is free now, below the ephemeral range, and not handed out before in
/// this process.
pub fn reserve(offsets: &[u32]) -> Result<u16> {
    let reach = offsets.iter().copied().max().unwrap_or(0);
    let top = ephemeral_low().saturating_sub(reach + 1);
    if top <= LOW {
        bail!("no room for ports below the ephemeral range");
    }
    let span = top - LOW;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = (std::process::id() ^ now) | 1;
    let mut guard = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    for _ in 0..2_000 {
        // xorshift32: enough to scatter bases without another dependency.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let b = LOW + x % span;
        let ports: Vec<u32> = offsets.iter().map(|o| b + o).collect();
        if ports.iter().any(|p| set.contains(p)) || !ports.iter().all(|&p| free(p)) {
            continue;
        }
        set.extend(ports);
        // `top` keeps b + reach below the ephemeral range, inside u16.
        return u16::try_from(b).map_err(|_| anyhow::anyhow!("port {b} out of range"));
    }
    bail!("no free loopback ports below {top}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_free_below_the_ephemeral_range_and_never_repeat() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let b = u32::from(reserve(&[0, 1, 10_000]).unwrap());
            for p in [b, b + 1, b + 10_000] {
                assert!(p < ephemeral_low(), "{p}");
                assert!(seen.insert(p), "port {p} handed out twice");
                assert!(free(p), "{p}");
            }
        }
    }
}
