//! What the kernel says about an interface, asked in the calling thread's
//! network namespace: `if_nametoindex`, `SIOCGIFHWADDR` and the ethtool
//! ioctl (`SIOCETHTOOL`), and `/proc/thread-self/net`. Not `/sys/class/net`:
//! sysfs shows the namespace of whoever mounted it, so a thread that entered
//! another network namespace (`bench --io xdp`) would not find its
//! interface there.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::wire::Mac;

/// A datagram socket for the ioctls (in the calling thread's namespace).
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `iface` (`None` if the name cannot be one).
fn ifreq(iface: &str) -> Option<libc::ifreq> {
    let bytes = iface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    Some(r)
}

/// The interface's index (`None`: no such interface here).
pub fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The interface's MAC address.
pub fn hw_addr(iface: &str) -> Option<Mac> {
    let s = ioctl_socket().ok()?;
    let mut r = ifreq(iface)?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut r) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, &s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = s as u8;
    }
    Some(m)
}

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Default)]
struct Channels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// Runs ethtool command `data` (its first `u32` is the command) on `iface`.
fn ethtool<T: ?Sized>(iface: &str, data: &mut T) -> io::Result<()> {
    let s = ioctl_socket()?;
    let mut r = ifreq(iface).ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
    r.ifr_ifru.ifru_data = (data as *mut T).cast::<libc::c_char>();
    // SAFETY: SIOCETHTOOL reads and writes `data`, which outlives the call
    // and is the structure its command expects.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCETHTOOL, &mut r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The RX queues the interface uses now (ethtool's channels: RX-only or
/// combined, whichever the driver counts), `None` if its driver does not
/// say.
pub fn rx_queues(iface: &str) -> Option<u32> {
    let mut c = Channels {
        cmd: ETHTOOL_GCHANNELS,
        ..Channels::default()
    };
    ethtool(iface, &mut c).ok()?;
    let n = c.rx_count.max(c.combined_count);
    (n > 0).then_some(n)
}

const ETHTOOL_GRSSH: u32 = 0x46;
/// `struct ethtool_rxfh` up to `rss_config`, in 32-bit words.
const RXFH_HEADER_WORDS: usize = 6;

/// The device's RSS indirection table and hash key (ethtool `-x`), for
/// [`super::rss`]; an error where the driver has none (a veth).
pub fn rss(iface: &str) -> io::Result<(Vec<u32>, Vec<u8>)> {
    // First the sizes, then the table and the key behind the header.
    let mut head = [0u32; RXFH_HEADER_WORDS];
    head[0] = ETHTOOL_GRSSH;
    ethtool(iface, &mut head)?;
    let (indir, key) = (head[2] as usize, head[3] as usize);
    if indir > 1 << 16 || key > 1 << 10 {
        return Err(io::Error::other("implausible RSS table or key size"));
    }
    let mut buf = vec![0u32; RXFH_HEADER_WORDS + indir + key.div_ceil(4)];
    buf[0] = ETHTOOL_GRSSH;
    buf[2] = indir as u32;
    buf[3] = key as u32;
    // SAFETY (inside `ethtool`): the buffer holds the header, the table
    // and the key the kernel said it would write.
    ethtool(iface, &mut buf[..])?;
    let table = buf[RXFH_HEADER_WORDS..RXFH_HEADER_WORDS + indir].to_vec();
    let key_bytes: Vec<u8> = buf[RXFH_HEADER_WORDS + indir..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(key)
        .collect();
    Ok((table, key_bytes))
}

/// Routes of one interface in this thread's namespace: (destination, mask,
/// gateway), from `/proc/thread-self/net/route`.
pub fn routes(iface: &str) -> Vec<(u32, u32, u32)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| std::fs::read_to_string("/proc/net/route"))
        .unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[0] != iface {
                return None;
            }
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            // The file prints each network-order word as a host integer.
            let addr = |s: &str| hex(s).map(|v| u32::from_be_bytes(v.to_ne_bytes()));
            Some((addr(f[1])?, addr(f[7])?, addr(f[2])?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_through_the_ioctls() {
        let i = ifindex("lo").expect("lo has an index");
        assert!(i > 0);
        assert_eq!(hw_addr("lo"), Some([0; 6]));
        assert_eq!(ifindex("nosuch0"), None);
        assert_eq!(hw_addr("nosuch0"), None);
        assert_eq!(ifreq("a-name-longer-than-ifnamsiz").map(|_| ()), None);
        // Loopback has no RSS: an error, not a table.
        assert!(rss("lo").is_err());
    }
}
