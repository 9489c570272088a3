//! What the loop does with each completion of a connection's receive,
//! send, connect and a listener's accept (the handler's callbacks come
//! from here), and TLS input.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Instant;

use io_uring::cqueue;
use socket2::SockRef;

use super::super::backend::{Close, Closed, ConnId, Handler, UNIX_PEER};
use super::super::conn_table::{is_fd_exhaustion, ACCEPT_PAUSE};
use super::super::socket;
use super::{Uring, KEEP_SEND_BYTES};

impl Uring {
    pub(super) fn on_recv<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        gen: u32,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.ops.io.in_flight -= 1;
        }
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.io.gen == gen) else {
            if let Some(b) = bid {
                self.bufs.give(b);
            }
            return;
        };
        if !more {
            c.io.recv_armed = false;
        }
        if res > 0 {
            if let Some(b) = bid {
                self.deliver(h, id, b, res as usize, now);
                self.bufs.give(b);
            }
        } else if res == 0 {
            c.io.peer_fin = true;
            self.after_fin(h, id, now);
        } else {
            match -res {
                // Out of buffers (re-armed below), or cancelled by us.
                libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                errno => self
                    .ops
                    .kill(id, Closed::Error(io::Error::from_raw_os_error(errno))),
            }
        }
        if !more {
            match self.ops.conns.get(id) {
                Some(c) if c.io.zombie => self.ops.maybe_free(id),
                Some(c) if c.live() && c.reading && !c.io.peer_fin => self.ops.io.rearm.push(id),
                _ => {}
            }
        }
    }

    /// `len` bytes arrived on `id` in buffer `bid`.
    fn deliver<H: Handler>(&mut self, h: &mut H, id: ConnId, bid: u16, len: usize, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || c.eof {
            return;
        }
        let data = self.bufs.data(bid, len);
        if let Some(t) = c.tls.as_mut() {
            if t.input.pos == t.input.buf.len() {
                t.input.buf.clear();
                t.input.pos = 0;
            }
            t.input.buf.extend_from_slice(data);
            self.pump_tls(h, id, now);
        } else if !c.reading || !c.held().is_empty() {
            c.extra().held.extend_from_slice(data);
        } else {
            h.on_input(&mut self.ops, now, id, data);
        }
    }

    /// The peer's FIN: reported once what arrived before it is delivered.
    fn after_fin<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || c.eof {
            return;
        }
        if c.tls.is_some() {
            self.pump_tls(h, id, now);
        } else if c.reading && c.held().is_empty() {
            c.eof = true;
            h.on_peer_closed(&mut self.ops, now, id);
        }
    }

    /// Reading was resumed: what was held goes first, then receive again.
    pub(super) fn resume_read<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || !c.reading {
            return;
        }
        if c.tls.is_some() {
            self.pump_tls(h, id, now);
        } else if !c.held().is_empty() {
            let held = std::mem::take(&mut c.extra().held);
            h.on_input(&mut self.ops, now, id, &held);
            // Keep the allocation if nothing was held meanwhile.
            if let Some(c) = self.ops.conns.get_mut(id) {
                if c.held().is_empty() && held.capacity() <= KEEP_SEND_BYTES {
                    let x = c.extra();
                    x.held = held;
                    x.held.clear();
                }
            }
        }
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if c.io.peer_fin && c.tls.is_none() {
            self.after_fin(h, id, now);
        } else if c.live() && c.reading && !c.io.recv_armed {
            self.ops.io.rearm.push(id);
        }
    }

    /// Feeds `id`'s ciphertext to rustls and hands out what it decrypts,
    /// while the handler reads.
    fn pump_tls<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        while let Some(c) = self.ops.tls_input(h, id, now, &mut self.read_buf) {
            let Some(t) = c.tls.as_mut() else { break };
            if t.input.pos == t.input.buf.len() {
                if c.io.peer_fin && !t.input.fin_fed {
                    // FIN: rustls reports close_notify or truncation.
                    t.input.fin_fed = true;
                    t.stream.peer_eof();
                    continue;
                }
                break;
            }
            match t.stream.read_ciphertext(&t.input.buf[t.input.pos..]) {
                Ok(n) => {
                    t.input.pos += n;
                    if t.input.pos == t.input.buf.len() {
                        t.input.buf.clear();
                        t.input.pos = 0;
                    }
                }
                Err(e) => {
                    // The alert is queued: deliver it, then close.
                    self.ops.fail_after_flush(id, e);
                    break;
                }
            }
        }
        // Handshake records (or an alert) to send.
        self.ops.mark_dirty(id);
    }

    pub(super) fn on_send<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        gen: u32,
        res: i32,
        now: Instant,
    ) {
        self.ops.io.in_flight -= 1;
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.io.gen == gen) else {
            return;
        };
        c.io.send_inflight = false;
        if c.io.zombie {
            self.ops.maybe_free(id);
            return;
        }
        if res < 0 {
            self.ops
                .kill(id, Closed::Error(io::Error::from_raw_os_error(-res)));
            return;
        }
        let before = c.app.sent;
        let had = c.pending() > 0;
        let n = res as usize;
        if n == 0 && c.io.send_pos < c.io.sending.len() {
            self.ops
                .kill(id, Closed::Error(io::ErrorKind::WriteZero.into()));
            return;
        }
        c.io.send_pos = (c.io.send_pos + n).min(c.io.sending.len());
        if c.io.send_pos == c.io.sending.len() {
            c.io.sending.clear();
            c.io.send_pos = 0;
            if c.io.sending.capacity() > KEEP_SEND_BYTES {
                c.io.sending = Vec::new();
            }
        }
        c.note_sent();
        let progressed = c.app.sent != before || (had && c.pending() == 0);
        let closing = c.closing.is_some();
        // More to send, or a graceful close to finish.
        self.ops.mark_dirty(id);
        if progressed && !closing {
            h.on_written(&mut self.ops, now, id);
        }
    }

    pub(super) fn on_connect<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        gen: u32,
        res: i32,
        now: Instant,
    ) {
        self.ops.io.in_flight -= 1;
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.io.gen == gen) else {
            return;
        };
        c.io.connecting = false;
        let dial = c.io.extra.as_mut().and_then(|x| x.dial.take());
        if c.io.extra.as_ref().is_some_and(|x| {
            x.held.is_empty() && x.close_deadline.is_none() && x.close_error.is_none()
        }) {
            c.io.extra = None;
        }
        if c.io.zombie {
            self.ops.maybe_free(id);
            return;
        }
        if c.closing.is_some() {
            // Closed while connecting: the close is under way.
            return;
        }
        if res < 0 {
            let e = match (-res, dial) {
                (libc::EADDRNOTAVAIL, Some(d)) => match d.addr.as_socket() {
                    Some(target) => socket::addr_not_available(target, d.source),
                    None => io::Error::from_raw_os_error(-res),
                },
                (errno, _) => io::Error::from_raw_os_error(errno),
            };
            // The id is gone after on_connected: no on_closed follows.
            c.io.notify = false;
            self.ops.io.open -= 1;
            self.ops.retire(id);
            h.on_connected(&mut self.ops, now, id, Err(e));
            return;
        }
        h.on_connected(&mut self.ops, now, id, Ok(()));
        self.ops.arm_recv(id);
        self.ops.mark_dirty(id);
    }

    pub(super) fn on_accept<H: Handler>(
        &mut self,
        h: &mut H,
        i: usize,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        if !cqueue::more(flags) {
            self.ops.io.in_flight -= 1;
            if let Some(l) = self.ops.io.listeners.get_mut(i) {
                l.armed = false;
            }
        }
        if res >= 0 {
            // SAFETY: a successful accept completion's result is a new
            // descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let Some(l) = self.ops.io.listeners.get(i) else {
                return;
            };
            if l.sock.is_none() {
                // Accepted just before the listener was stopped.
                return;
            }
            let implicit_tls = l.implicit_tls;
            let peer = if l.unix {
                UNIX_PEER
            } else {
                match SockRef::from(&fd)
                    .peer_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                {
                    Some(p) => p,
                    // The peer is already gone: next one.
                    None => return,
                }
            };
            let id = self.ops.insert(fd);
            self.ops.io.open += 1;
            if h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                self.ops.arm_recv(id);
                self.ops.mark_dirty(id);
            } else {
                // Refused: what the handler wrote (e.g. a 421) goes out,
                // then the socket closes, with no on_closed.
                self.ops.io.open -= 1;
                if let Some(c) = self.ops.conns.get_mut(id) {
                    c.io.notify = false;
                    c.reading = false;
                    if c.closing.is_none() {
                        c.closing = Some(Close::Graceful);
                    }
                }
                self.ops.timers.cancel(id);
                self.ops.mark_dirty(id);
            }
        } else if is_fd_exhaustion(Some(-res)) {
            // Out of descriptors or memory: the backlog stays, so accepting
            // again now would spin; rest the listener instead.
            self.ops.io.accept_paused_until = Some(now + ACCEPT_PAUSE);
            return;
        }
        let armed = self.ops.io.listeners.get(i).is_some_and(|l| l.armed);
        if !armed && self.ops.io.accept_paused_until.is_none() {
            self.ops.arm_accept(i);
        }
    }
}
