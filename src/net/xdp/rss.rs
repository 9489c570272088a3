//! Receive-side scaling as a NIC computes it: the Toeplitz hash of a
//! flow's addresses and ports under the device's key, and the indirection
//! table that maps the hash to a queue. With it a blaster can pick source
//! ports whose replies the NIC delivers to the queue of the thread that
//! sent them ([`port_for_queue`]); the key and table are read from the
//! device with the ethtool ioctl ([`super::nic::rss`]).
//!
//! Tested against the verification vectors Microsoft publishes with the
//! RSS specification ("Verifying the RSS Hash Calculation").
//!
//! Not wired into the blaster yet: a veth (the only device the tests have)
//! has no RSS, so nothing here can be checked end to end on this machine.

use std::net::Ipv4Addr;

/// The RSS key of the specification's examples (many drivers' default).
pub const DEFAULT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// The Toeplitz hash of `input` under `key` (`key` must be at least 4
/// bytes longer than `input`; missing key bytes count as zero).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let k = |i: usize| u32::from(key.get(i).copied().unwrap_or(0));
    // The 32 key bits that line up with the current input bit.
    let mut window = (k(0) << 24) | (k(1) << 16) | (k(2) << 8) | k(3);
    let mut hash = 0u32;
    for (i, &byte) in input.iter().enumerate() {
        let next = k(i + 4);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | ((next >> (7 - bit)) & 1);
        }
    }
    hash
}

/// The hash of a TCP/IPv4 segment from `src` to `dst` (the NIC's order:
/// source address, destination address, source port, destination port).
pub fn tcp4(key: &[u8], src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> u32 {
    let mut input = [0u8; 12];
    input[0..4].copy_from_slice(&src.octets());
    input[4..8].copy_from_slice(&dst.octets());
    input[8..10].copy_from_slice(&sport.to_be_bytes());
    input[10..12].copy_from_slice(&dport.to_be_bytes());
    toeplitz(key, &input)
}

/// The queue a hash lands on: the indirection table indexed by the hash's
/// low bits (the table's length is a power of two on every NIC; any
/// length works here).
pub fn queue(table: &[u32], hash: u32) -> Option<u32> {
    if table.is_empty() {
        return None;
    }
    table.get(hash as usize % table.len()).copied()
}

/// The first source port in `ports` (inclusive) whose replies — segments
/// from `target:target_port` to `us:port` — the NIC delivers to `want`.
pub fn port_for_queue(
    key: &[u8],
    table: &[u32],
    us: Ipv4Addr,
    target: Ipv4Addr,
    target_port: u16,
    ports: (u16, u16),
    want: u32,
) -> Option<u16> {
    (ports.0..=ports.1).find(|&p| queue(table, tcp4(key, target, target_port, us, p)) == Some(want))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's RSS verification vectors: (destination, destination
    /// port, source, source port, IPv4 hash, IPv4-with-TCP hash).
    const VECTORS: [(&str, u16, &str, u16, u32, u32); 5] = [
        (
            "161.142.100.80",
            1766,
            "66.9.149.187",
            2794,
            0x323e_8fc2,
            0x51cc_c178,
        ),
        (
            "65.69.140.83",
            4739,
            "199.92.111.2",
            14230,
            0xd718_262a,
            0xc626_b0ea,
        ),
        (
            "12.22.207.184",
            38024,
            "24.19.198.95",
            12898,
            0xd2d0_a5de,
            0x5c2b_394a,
        ),
        (
            "209.142.163.6",
            2217,
            "38.27.205.30",
            48228,
            0x8298_9176,
            0xafc7_327f,
        ),
        (
            "202.188.127.2",
            1303,
            "153.39.163.191",
            44251,
            0x5d18_09c5,
            0x10e8_28a2,
        ),
    ];

    #[test]
    fn toeplitz_matches_the_published_rss_verification_vectors() {
        for (dst, dport, src, sport, ip_hash, tcp_hash) in VECTORS {
            let (dst, src): (Ipv4Addr, Ipv4Addr) = (dst.parse().unwrap(), src.parse().unwrap());
            let mut ips = [0u8; 8];
            ips[..4].copy_from_slice(&src.octets());
            ips[4..].copy_from_slice(&dst.octets());
            assert_eq!(toeplitz(&DEFAULT_KEY, &ips), ip_hash, "{src} -> {dst}");
            assert_eq!(
                tcp4(&DEFAULT_KEY, src, sport, dst, dport),
                tcp_hash,
                "{src}:{sport} -> {dst}:{dport}"
            );
        }
    }

    #[test]
    fn a_source_port_is_found_for_every_queue_and_its_replies_land_there() {
        let table: Vec<u32> = (0..128).map(|i| i % 4).collect();
        let (us, target) = (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 1));
        for want in 0..4 {
            let p = port_for_queue(&DEFAULT_KEY, &table, us, target, 25, (10000, 10999), want)
                .expect("a port for each queue");
            let h = tcp4(&DEFAULT_KEY, target, 25, us, p);
            assert_eq!(queue(&table, h), Some(want));
        }
        assert_eq!(queue(&[], 7), None);
    }
}
