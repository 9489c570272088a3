//! The XDP program and its loader: a dozen hand-assembled eBPF instructions
//! loaded with the raw `bpf(2)` syscall (no clang, no libbpf, no ELF).
//!
//! The program redirects to the queue's AF_XDP socket (an `XSKMAP` indexed
//! by RX queue) exactly the frames that are ours:
//! - IPv4 TCP (no IP options) to our address whose destination port is one
//!   of our listening ports or inside our source-port range;
//! - ARP whose target address is ours (requests for us, replies to us);
//!
//! and passes everything else to the kernel (`XDP_PASS`), as it also does
//! when the queue has no socket in the map (`bpf_redirect_map` with
//! `XDP_PASS` as its fallback). It is attached with a BPF link: closing
//! the link's descriptor (the run ends, or the process dies) detaches it,
//! so nothing is left on the interface.
//!
//! Invariants: every packet access is preceded by one bounds check against
//! `data_end` covering all of it (42 bytes: Ethernet + ARP, or Ethernet +
//! IPv4 + the TCP ports); every jump target is a label resolved at
//! assembly time.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// bpf(2) commands.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE`: generic XDP (the kernel builds an skb first).
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: the driver runs the program (native).
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

const XDP_PASS: i32 = 2;
const FN_REDIRECT_MAP: i32 = 51;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.dst & 0xf) | (self.src << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

/// A jump whose target is a label, resolved by [`Asm::finish`].
enum Slot {
    Done(Insn),
    Jump(Insn, &'static str),
}

/// A tiny assembler: instructions, labels, and jumps to labels.
#[derive(Default)]
struct Asm {
    slots: Vec<Slot>,
    labels: Vec<(&'static str, usize)>,
}

// Opcodes (class | op | source).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const AND64_K: u8 = 0x57;
const TO_BE: u8 = 0xdc;
const JGT_X: u8 = 0x2d;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JLT_K: u8 = 0xa5;
const JGT_K: u8 = 0x25;
const JMP32_JNE_K: u8 = 0x56;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.slots.push(Slot::Done(Insn {
            code,
            dst,
            src,
            off,
            imm,
        }));
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) {
        self.slots.push(Slot::Jump(
            Insn {
                code,
                dst,
                src,
                off: 0,
                imm,
            },
            to,
        ));
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.slots.len()));
    }

    fn finish(self) -> Vec<Insn> {
        let at = |name: &str| {
            self.labels
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, i)| *i)
                .unwrap_or_else(|| panic!("label {name} is defined"))
        };
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Slot::Done(insn) => *insn,
                Slot::Jump(insn, to) => Insn {
                    off: (at(to) as i64 - i as i64 - 1) as i16,
                    ..*insn
                },
            })
            .collect()
    }
}

/// What the program redirects (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub ip: Ipv4Addr,
    /// Listening ports (at most 8).
    pub ports: Vec<u16>,
    /// Our source ports, inclusive (empty when `lo > hi`).
    pub port_lo: u16,
    pub port_hi: u16,
}

/// Most listening ports the program checks one by one.
pub const MAX_PORTS: usize = 8;

/// Assembles the program for `f`, with the XSKMAP's descriptor `map_fd`.
pub fn program(f: &Filter, map_fd: RawFd) -> Vec<Insn> {
    // The address as a 32-bit load from the packet sees it (host order of
    // the network bytes).
    let ip_raw = i32::from_ne_bytes(f.ip.octets());
    let mut a = Asm::default();
    // r6 = ctx; r2 = data; r3 = data_end.
    a.op(MOV64_X, 6, 1, 0, 0);
    a.op(LDX_W, 2, 1, 0, 0);
    a.op(LDX_W, 3, 1, 4, 0);
    // if data + 42 > data_end: pass.
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 42);
    a.jump(JGT_X, 4, 3, 0, "pass");
    // Ethertype, as loaded from network order: 0x0008 IPv4, 0x0608 ARP.
    a.op(LDX_H, 5, 2, 12, 0);
    a.jump(JEQ_K, 5, 0, 0x0608, "arp");
    a.jump(JNE_K, 5, 0, 0x0008, "pass");
    // IPv4 without options (IHL 5), protocol TCP, to our address.
    a.op(LDX_B, 5, 2, 14, 0);
    a.op(AND64_K, 5, 0, 0, 0x0f);
    a.jump(JNE_K, 5, 0, 5, "pass");
    a.op(LDX_B, 5, 2, 23, 0);
    a.jump(JNE_K, 5, 0, 6, "pass");
    a.op(LDX_W, 5, 2, 30, 0);
    a.jump(JMP32_JNE_K, 5, 0, ip_raw, "pass");
    // The destination port, to host order.
    a.op(LDX_H, 5, 2, 36, 0);
    a.op(TO_BE, 5, 0, 0, 16);
    for &p in f.ports.iter().take(MAX_PORTS) {
        a.jump(JEQ_K, 5, 0, i32::from(p), "redirect");
    }
    if f.port_lo <= f.port_hi {
        a.jump(JLT_K, 5, 0, i32::from(f.port_lo), "pass");
        a.jump(JGT_K, 5, 0, i32::from(f.port_hi), "pass");
        a.jump(JA, 0, 0, 0, "redirect");
    } else {
        // (The verifier rejects unreachable instructions: one jump only.)
        a.jump(JA, 0, 0, 0, "pass");
    }
    // ARP: the target protocol address (offset 14 + 24) is ours.
    a.label("arp");
    a.op(LDX_W, 5, 2, 38, 0);
    a.jump(JMP32_JNE_K, 5, 0, ip_raw, "pass");
    a.label("redirect");
    // return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)
    a.op(LDX_W, 2, 6, 16, 0);
    a.op(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd);
    a.op(0, 0, 0, 0, 0);
    a.op(MOV64_K, 3, 0, 0, XDP_PASS);
    a.op(CALL, 0, 0, 0, FN_REDIRECT_MAP);
    a.op(EXIT, 0, 0, 0, 0);
    a.label("pass");
    a.op(MOV64_K, 0, 0, 0, XDP_PASS);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// A `union bpf_attr` as bytes (the kernel reads only what a command uses;
/// the rest must be zero).
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, at: usize, v: u32) -> Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, at: usize, v: &[u8]) -> Self {
        self.0[at..at + v.len()].copy_from_slice(v);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed; every
    // pointer stored in it points to memory alive for this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

/// Creates an `XSKMAP` with `entries` slots (one per queue id).
pub fn xsk_map(entries: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32(0, BPF_MAP_TYPE_XSKMAP)
        .u32(4, 4)
        .u32(8, 4)
        .u32(12, entries.max(1))
        .bytes(28, b"smtpstorm_xsks");
    bpf(BPF_MAP_CREATE, &mut a).map(fd)
}

/// Puts the AF_XDP socket `xsk` in `map` at `queue`.
pub fn map_set(map: &OwnedFd, queue: u32, xsk: RawFd) -> io::Result<()> {
    let key = queue;
    let value = xsk as u32;
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, &value as *const u32 as u64)
        .u64(24, 0);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

/// Loads `insns` as an XDP program; on a verifier error the message
/// carries the verifier's last lines.
pub fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let code: Vec<u8> = insns.iter().flat_map(Insn::bytes).collect();
    let license = b"Dual MIT/GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new()
        .u32(0, BPF_PROG_TYPE_XDP)
        .u32(4, insns.len() as u32)
        .u64(8, code.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .bytes(48, b"smtpstorm_xdp")
        .u32(68, BPF_XDP);
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(r) => Ok(fd(r)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            if tail.is_empty() {
                Err(e)
            } else {
                Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{e}: verifier: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    ),
                ))
            }
        }
    }
}

/// Attaches `prog` to interface `ifindex` with a BPF link (`flags`: SKB or
/// DRV mode); the program stays attached while the returned descriptor is
/// open.
pub fn attach(prog: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_XDP)
        .u32(12, flags);
    bpf(BPF_LINK_CREATE, &mut a).map(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> Filter {
        Filter {
            ip: Ipv4Addr::new(198, 18, 0, 1),
            ports: vec![25, 465],
            port_lo: 10000,
            port_hi: 32767,
        }
    }

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = program(&filter(), 7);
        for (i, insn) in p.iter().enumerate() {
            let class = insn.code & 0x07;
            let is_jump =
                (class == 0x05 || class == 0x06) && insn.code != CALL && insn.code != EXIT;
            if is_jump {
                let to = i as i64 + 1 + i64::from(insn.off);
                assert!(
                    to > i as i64 && (to as usize) < p.len(),
                    "insn {i} jumps to {to}"
                );
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
    }

    /// Instructions reachable from the first (the verifier rejects a
    /// program with any other).
    fn reachable(p: &[Insn]) -> Vec<bool> {
        let mut seen = vec![false; p.len()];
        let mut todo = vec![0usize];
        while let Some(i) = todo.pop() {
            if i >= p.len() || seen[i] {
                continue;
            }
            seen[i] = true;
            let insn = p[i];
            let target = (i as i64 + 1 + i64::from(insn.off)) as usize;
            match insn.code {
                EXIT => {}
                JA => todo.push(target),
                LD_IMM64 => {
                    seen[i + 1] = true;
                    todo.push(i + 2);
                }
                c if c & 0x07 == 0x05 || c & 0x07 == 0x06 => {
                    if c != CALL {
                        todo.push(target);
                    }
                    todo.push(i + 1);
                }
                _ => todo.push(i + 1),
            }
        }
        seen
    }

    #[test]
    fn no_instruction_is_unreachable_with_or_without_ports_or_range() {
        let mut variants = vec![filter()];
        let mut f = filter();
        f.ports.clear();
        variants.push(f.clone());
        f.ports = vec![25];
        f.port_lo = 1;
        f.port_hi = 0;
        variants.push(f);
        for f in variants {
            let p = program(&f, 3);
            let r = reachable(&p);
            assert!(
                r.iter().all(|&x| x),
                "{f:?}: unreachable {:?}",
                r.iter().positions_false()
            );
        }
    }

    trait PositionsFalse {
        fn positions_false(self) -> Vec<usize>;
    }

    impl<'a, I: Iterator<Item = &'a bool>> PositionsFalse for I {
        fn positions_false(self) -> Vec<usize> {
            self.enumerate()
                .filter(|(_, b)| !**b)
                .map(|(i, _)| i)
                .collect()
        }
    }

    #[test]
    fn the_address_is_compared_as_the_packet_holds_it() {
        let p = program(&filter(), 7);
        let cmp: Vec<&Insn> = p.iter().filter(|i| i.code == JMP32_JNE_K).collect();
        assert_eq!(cmp.len(), 2, "IPv4 destination and ARP target");
        for i in cmp {
            assert_eq!(i.imm.to_ne_bytes(), [198, 18, 0, 1]);
        }
    }

    #[test]
    fn listening_ports_and_the_source_range_are_all_checked() {
        let p = program(&filter(), 7);
        let eq: Vec<i32> = p
            .iter()
            .filter(|i| i.code == JEQ_K && i.dst == 5)
            .map(|i| i.imm)
            .collect();
        assert!(eq.contains(&25) && eq.contains(&465));
        assert!(p.iter().any(|i| i.code == JLT_K && i.imm == 10000));
        assert!(p.iter().any(|i| i.code == JGT_K && i.imm == 32767));
        // Without a range, nothing but the ports is redirected.
        let mut f = filter();
        f.port_lo = 1;
        f.port_hi = 0;
        let p = program(&f, 7);
        assert!(!p.iter().any(|i| i.code == JLT_K));
    }

    #[test]
    fn the_map_descriptor_is_a_pseudo_map_load() {
        let p = program(&filter(), 42);
        let i = p.iter().position(|i| i.code == LD_IMM64).unwrap();
        assert_eq!((p[i].src, p[i].imm), (PSEUDO_MAP_FD, 42));
        assert_eq!(
            p[i + 1],
            Insn {
                code: 0,
                dst: 0,
                src: 0,
                off: 0,
                imm: 0
            }
        );
    }
}
