//! Ethernet, ARP, IPv4 and TCP as far as the AF_XDP backend needs them
//! below smoltcp (which sees bare IP packets): classifying a received
//! frame, checking its checksums, and building ARP frames.
//!
//! Checksums on receive: smoltcp is told not to verify them (it would drop
//! what a veth peer sends), and [`classify`] verifies them instead. A peer
//! with TX checksum offload (a veth, or a bridge in front of one) hands us
//! TCP segments whose checksum field holds only the pseudo-header sum that
//! the offload engine was meant to complete; such a segment is accepted as
//! "partial" (on a virtual link nothing can corrupt it), and smoltcp never
//! looks at the field. Every other bad checksum is dropped.
//!
//! Checksums on transmit: smoltcp leaves them zero and [`fill_checksums`]
//! fills them in as the frame leaves (64-bit words; smoltcp sums 16-bit
//! ones).
//!
//! Invariants: no function panics on any input (every length is checked);
//! nothing allocates.

use std::net::Ipv4Addr;

/// A MAC address.
pub type Mac = [u8; 6];

pub const ETH_LEN: usize = 14;
const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;

/// What a received frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A TCP segment for us: the IP packet is `frame[ETH_LEN..ETH_LEN + ip_len]`.
    Tcp {
        src_mac: Mac,
        src: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        /// SYN without ACK: a new connection.
        syn: bool,
        ip_len: usize,
    },
    /// An ARP request or reply for our address.
    Arp {
        op: u16,
        sender_mac: Mac,
        sender_ip: Ipv4Addr,
    },
    /// Anything else, or a bad checksum.
    Other,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The ones' complement sum of `data` added to `sum`, folded to 32 bits
/// (not to 16). Big-endian 64-bit words at a time, the carry of each add
/// added back: 2^16 is 1 modulo 0xffff, so this folds to the same 16-bit
/// sum as 16-bit words would.
fn sum(data: &[u8], acc: u32) -> u32 {
    let mut s = u64::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (r, carry) = s.overflowing_add(w);
        s = r + u64::from(carry);
    }
    // At most 33 bits now: the tail's adds cannot overflow.
    s = (s & 0xffff_ffff) + (s >> 32);
    let rest = chunks.remainder();
    let mut i = 0;
    if rest.len() >= 4 {
        s += u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]));
        i = 4;
    }
    if rest.len() >= i + 2 {
        s += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    // An odd last byte is the high byte of its 16-bit word.
    if let Some(&last) = rest.get(i) {
        s += u64::from(last) << 8;
    }
    while s >> 32 != 0 {
        s = (s & 0xffff_ffff) + (s >> 32);
    }
    s as u32
}

/// Fills in the IPv4 header checksum and the TCP checksum of the IPv4
/// packet `ip` (as smoltcp left it: both fields zero). Anything but a
/// whole TCP/IPv4 packet is left as it is.
pub fn fill_checksums(ip: &mut [u8]) {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < 20 || total < ihl || total > ip.len() {
        return;
    }
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    if ip[9] != 6 || total < ihl + 20 {
        return;
    }
    let ph = pseudo(&ip[12..16], &ip[16..20], total - ihl);
    let tcp = &mut ip[ihl..total];
    tcp[16..18].copy_from_slice(&[0, 0]);
    let c = !fold(sum(tcp, u32::from(ph)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP pseudo-header sum (folded, not complemented).
fn pseudo(src: &[u8], dst: &[u8], tcp_len: usize) -> u16 {
    let word = |b: &[u8]| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let s = word(src) + word(dst) + 6 + tcp_len as u64;
    let s = (s & 0xffff_ffff) + (s >> 32);
    fold(((s & 0xffff_ffff) + (s >> 32)) as u32)
}

/// Classifies a frame received for `our_ip`, checking its checksums.
pub fn classify(frame: &[u8], our_ip: Ipv4Addr) -> Frame {
    if frame.len() < ETH_LEN {
        return Frame::Other;
    }
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    match be16(frame, 12) {
        ETH_ARP => classify_arp(&frame[ETH_LEN..], our_ip),
        ETH_IPV4 => classify_ipv4(&frame[ETH_LEN..], src_mac, our_ip),
        _ => Frame::Other,
    }
}

fn classify_arp(p: &[u8], our_ip: Ipv4Addr) -> Frame {
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4.
    if p.len() < 28 || be16(p, 0) != 1 || be16(p, 2) != ETH_IPV4 || p[4] != 6 || p[5] != 4 {
        return Frame::Other;
    }
    if p[24..28] != our_ip.octets() {
        return Frame::Other;
    }
    let mut sender_mac = [0u8; 6];
    sender_mac.copy_from_slice(&p[8..14]);
    Frame::Arp {
        op: be16(p, 6),
        sender_mac,
        sender_ip: Ipv4Addr::new(p[14], p[15], p[16], p[17]),
    }
}

fn classify_ipv4(p: &[u8], src_mac: Mac, our_ip: Ipv4Addr) -> Frame {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return Frame::Other;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(be16(p, 2));
    if ihl < 20 || total < ihl + 20 || total > p.len() {
        return Frame::Other;
    }
    // Fragments are not ours to reassemble (SMTP segments never are).
    if be16(p, 6) & 0x3fff != 0 || p[9] != 6 || p[16..20] != our_ip.octets() {
        return Frame::Other;
    }
    if fold(sum(&p[..ihl], 0)) != 0xffff {
        return Frame::Other;
    }
    let tcp = &p[ihl..total];
    let tcp_len = tcp.len();
    let ph = pseudo(&p[12..16], &p[16..20], tcp_len);
    let full = fold(sum(tcp, u32::from(ph)));
    // A complete checksum sums to 0xffff; a partial one (TX offload left
    // undone) holds the pseudo-header sum itself.
    if full != 0xffff && be16(tcp, 16) != ph {
        return Frame::Other;
    }
    let flags = tcp[13];
    Frame::Tcp {
        src_mac,
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        src_port: be16(tcp, 0),
        dst_port: be16(tcp, 2),
        syn: flags & 0x12 == 0x02,
        ip_len: total,
    }
}

/// The destination address of an IPv4 packet (`None` if too short).
pub fn ipv4_dst(ip: &[u8]) -> Option<Ipv4Addr> {
    let d = ip.get(16..20)?;
    Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
}

/// Writes an Ethernet header (IPv4) at the start of `frame`.
pub fn put_eth(frame: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Ethernet type of IPv4, for [`put_eth`].
pub const ETHERTYPE_IPV4: u16 = ETH_IPV4;

/// Length of an ARP frame (without padding).
pub const ARP_FRAME_LEN: usize = ETH_LEN + 28;

/// Builds an ARP frame into `out` (at least [`ARP_FRAME_LEN`] bytes):
/// a request (`op` 1, broadcast, target MAC zero) or a reply (`op` 2).
pub fn put_arp(
    out: &mut [u8],
    op: u16,
    our_mac: Mac,
    our_ip: Ipv4Addr,
    their_mac: Mac,
    their_ip: Ipv4Addr,
) {
    let dst = if op == 1 { [0xff; 6] } else { their_mac };
    put_eth(out, dst, our_mac, ETH_ARP);
    let p = &mut out[ETH_LEN..ARP_FRAME_LEN];
    p[0..2].copy_from_slice(&1u16.to_be_bytes());
    p[2..4].copy_from_slice(&ETH_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&our_mac);
    p[14..18].copy_from_slice(&our_ip.octets());
    p[18..24].copy_from_slice(if op == 1 { &[0; 6] } else { &their_mac });
    p[24..28].copy_from_slice(&their_ip.octets());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_checksums_are_what_smoltcp_computes() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
            TcpSeqNumber,
        };
        for payload_len in [0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, 1459] {
            let payload: Vec<u8> = (0..payload_len).map(|i| (i * 37 + 11) as u8).collect();
            let (src, dst) = (
                Ipv4Address::new(198, 18, 0, 1),
                Ipv4Address::new(198, 18, 0, 2),
            );
            let tcp = TcpRepr {
                src_port: 2525,
                dst_port: 10001,
                control: TcpControl::Psh,
                seq_number: TcpSeqNumber(0x1234_5678),
                ack_number: Some(TcpSeqNumber(0x0fed_cba9)),
                window_len: 4000,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: [None, None, None],
                timestamp: None,
                payload: &payload,
            };
            let ip = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let mut want = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
            let caps = ChecksumCapabilities::default();
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut want[..]), &caps);
            tcp.emit(
                &mut TcpPacket::new_unchecked(&mut want[20..]),
                &src.into(),
                &dst.into(),
                &caps,
            );
            let mut got = want.clone();
            got[10..12].copy_from_slice(&[0, 0]);
            got[36..38].copy_from_slice(&[0, 0]);
            fill_checksums(&mut got);
            assert_eq!(got, want, "payload {payload_len}");
        }
    }

    const US: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    /// A TCP segment from PEER to US with `payload`; `partial`: the
    /// checksum as a TX-offloading peer leaves it.
    fn segment(flags: u8, payload: &[u8], partial: bool) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN];
        put_eth(&mut f, [2; 6], [4, 0, 0, 0, 0, 9], ETH_IPV4);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&PEER.octets());
        ip.extend_from_slice(&US.octets());
        let c = !fold(sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&25u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp.extend_from_slice(payload);
        let ph = pseudo(&PEER.octets(), &US.octets(), tcp.len());
        let check = if partial {
            ph
        } else {
            !fold(sum(&tcp, u32::from(ph)))
        };
        tcp[16..18].copy_from_slice(&check.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        f
    }

    #[test]
    fn a_syn_with_a_full_checksum_is_a_new_tcp_flow() {
        let f = segment(0x02, b"", false);
        match classify(&f, US) {
            Frame::Tcp {
                src,
                src_port,
                dst_port,
                syn,
                ip_len,
                src_mac,
            } => {
                assert_eq!(
                    (src, src_port, dst_port, syn, ip_len),
                    (PEER, 40000, 25, true, 40)
                );
                assert_eq!(src_mac, [4, 0, 0, 0, 0, 9]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_partial_checksum_from_an_offloading_peer_is_accepted() {
        for payload in [&b""[..], b"EHLO x\r\n", b"odd"] {
            let f = segment(0x18, payload, true);
            assert!(
                matches!(classify(&f, US), Frame::Tcp { syn: false, .. }),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn a_corrupted_segment_is_dropped_whatever_byte_is_hit() {
        let good = segment(0x18, b"MAIL FROM:<a@b>\r\n", false);
        for i in ETH_LEN..good.len() {
            let mut f = good.clone();
            f[i] ^= 0x40;
            let c = classify(&f, US);
            // Flipping a bit of the destination address makes it not ours;
            // any other flip breaks a checksum (or the header).
            assert_eq!(c, Frame::Other, "byte {i}");
        }
    }

    #[test]
    fn the_word_sum_folds_like_a_sum_of_16_bit_words() {
        let data: Vec<u8> = (0..1001u32)
            .map(|i| (i * 7919 % 251) as u8 ^ 0xa5)
            .collect();
        for n in 0..data.len() {
            let d = &data[..n];
            let mut naive: u32 = 0xfffe;
            for c in d.chunks(2) {
                naive += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            assert_eq!(fold(sum(d, 0xfffe)), fold(naive), "length {n}");
        }
    }

    #[test]
    fn truncated_frames_are_other_at_every_length() {
        let good = segment(0x18, b"DATA\r\n", false);
        for n in 0..good.len() {
            assert_eq!(classify(&good[..n], US), Frame::Other, "length {n}");
        }
    }

    #[test]
    fn segments_for_another_address_are_not_ours() {
        let f = segment(0x02, b"", false);
        assert_eq!(classify(&f, Ipv4Addr::new(198, 18, 0, 3)), Frame::Other);
    }

    #[test]
    fn an_arp_request_round_trips_through_put_arp_and_classify() {
        let mut f = [0u8; ARP_FRAME_LEN];
        put_arp(&mut f, 1, [4, 0, 0, 0, 0, 9], PEER, [0; 6], US);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(
            classify(&f, US),
            Frame::Arp {
                op: 1,
                sender_mac: [4, 0, 0, 0, 0, 9],
                sender_ip: PEER
            }
        );
        // For someone else: not ours.
        assert_eq!(classify(&f, Ipv4Addr::new(198, 18, 0, 7)), Frame::Other);
    }
}
