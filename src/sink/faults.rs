//! Fault injection for the sink: `--fault SPEC` rules turned into
//! [`Verdict`]s for the protocol engine.
//!
//! Each worker thread owns a [`ThreadFaults`] with its own PRNG (splitmix64
//! seeded from `--seed` and the thread index), so a run is deterministic
//! for a given seed, thread count and per-thread command order, and the hot
//! path takes no lock. Two pieces are shared on purpose, off the default
//! path: the greylist table (a `Mutex<HashMap>`, touched only when a
//! greylist rule exists, once per RCPT) and nothing else — the connect rate
//! limit is a per-thread token bucket holding `N / threads` tokens per
//! second.
//!
//! Invariants: with no rules, [`ThreadFaults::verdict`] returns `Proceed`
//! without drawing a random number; the first rule of a point that fires
//! decides the verdict (rules are tried in the order given).

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::smtp::server::{CommandInfo, Verdict};
use crate::smtp::CommandKind;
use crate::units::{parse_count, parse_duration, parse_percent};

/// The SMTP step a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    Connect,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    /// End of DATA body, or BDAT LAST.
    Dot,
    Quit,
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultAction {
    /// Answer with this code instead of acting.
    Reply(u16),
    /// Delay the reply by a time drawn uniformly from the range.
    Delay { min: Duration, max: Duration },
    /// Close without a reply.
    Disconnect,
    /// `421` then close.
    Disconnect421,
    /// First attempt of a (sender, recipient, IP) triple tempfails with 451;
    /// a retry after `window` succeeds.
    Greylist { window: Duration },
    /// More than `per_sec` new sessions in a second get `421` (token bucket).
    RateLimit { per_sec: u64 },
    /// `dot:stored=CODE`: take the whole message, then answer CODE as a
    /// server that stored it and failed before acknowledging would; with
    /// `--trace` the message counts as delivered, so a relay that retries
    /// delivers it twice (a duplicate).
    Stored(u16),
}

/// One `--fault` flag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    pub point: FaultPoint,
    pub action: FaultAction,
    /// Probability in 0..=1 that the fault fires.
    pub probability: f64,
}

impl FromStr for FaultSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_fault(s)
    }
}

/// Grammar: `POINT:ACTION[:PROBABILITY]` where POINT is one of connect, ehlo
/// (also helo/lhlo), mail, rcpt, data, dot (also bdat), quit and ACTION is a
/// reply code (4xx/5xx), `disconnect`, `disconnect421`, `delay=D` or
/// `delay=D..D`, `greylist[=WINDOW]`, `ratelimit=N`, `stored=CODE` (dot only).
pub fn parse_fault(s: &str) -> Result<FaultSpec, String> {
    let form = "expected POINT:ACTION[:PCT] like rcpt:451:5%, data:disconnect:1%, \
                ehlo:delay=200ms, rcpt:greylist or connect:ratelimit=100";
    let err = |why: &str| format!("{why} in `{s}`; {form}");
    let mut parts = s.split(':');
    let point = match parts
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "connect" => FaultPoint::Connect,
        "ehlo" | "helo" | "lhlo" => FaultPoint::Ehlo,
        "mail" => FaultPoint::Mail,
        "rcpt" => FaultPoint::Rcpt,
        "data" => FaultPoint::Data,
        "dot" | "bdat" => FaultPoint::Dot,
        "quit" => FaultPoint::Quit,
        other => return Err(err(&format!("unknown point `{other}`"))),
    };
    let action_s = parts.next().ok_or_else(|| err("missing action"))?.trim();
    let action = if let Some(d) = action_s.strip_prefix("delay=") {
        let (min, max) = match d.split_once("..") {
            Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
            None => {
                let v = parse_duration(d)?;
                (v, v)
            }
        };
        if min > max {
            return Err(err("delay range MIN..MAX with MIN > MAX"));
        }
        FaultAction::Delay { min, max }
    } else if action_s == "disconnect" {
        FaultAction::Disconnect
    } else if action_s == "disconnect421" {
        FaultAction::Disconnect421
    } else if action_s == "greylist" {
        FaultAction::Greylist {
            window: Duration::from_secs(1),
        }
    } else if let Some(w) = action_s.strip_prefix("greylist=") {
        FaultAction::Greylist {
            window: parse_duration(w)?,
        }
    } else if let Some(n) = action_s.strip_prefix("ratelimit=") {
        let per_sec = parse_count(n)?;
        if point != FaultPoint::Connect {
            return Err(err("ratelimit applies to connect only"));
        }
        FaultAction::RateLimit { per_sec }
    } else if let Some(c) = action_s.strip_prefix("stored=") {
        let code = c
            .parse::<u16>()
            .map_err(|_| err("stored=CODE needs a reply code"))?;
        if !(400..=599).contains(&code) || point != FaultPoint::Dot {
            return Err(err(
                "stored=CODE applies to dot only, with a 4xx or 5xx code",
            ));
        }
        FaultAction::Stored(code)
    } else if let Ok(code) = action_s.parse::<u16>() {
        if !(400..=599).contains(&code) {
            return Err(err("reply code must be 4xx or 5xx"));
        }
        FaultAction::Reply(code)
    } else {
        return Err(err(&format!("unknown action `{action_s}`")));
    };
    if matches!(action, FaultAction::Greylist { .. }) && point != FaultPoint::Rcpt {
        return Err(err("greylist applies to rcpt only"));
    }
    let probability = match parts.next() {
        None => 1.0,
        Some(p) => parse_percent(p).map_err(|e| err(&e))?,
    };
    if parts.next().is_some() {
        return Err(err("too many fields"));
    }
    Ok(FaultSpec {
        point,
        action,
        probability,
    })
}

pub use crate::rng::SplitMix64;

/// Key of the greylist table: (sender, recipient, client IP).
type Triple = (Vec<u8>, Vec<u8>, IpAddr);

/// The greylist table shared by every thread: when each triple was first seen.
#[derive(Debug, Default)]
pub struct Greylist {
    first_seen: Mutex<HashMap<Triple, Instant>>,
}

impl Greylist {
    /// True if this attempt must be tempfailed: the triple is new, or its
    /// first attempt is less than `window` ago.
    pub fn defer(
        &self,
        from: &[u8],
        to: &[u8],
        ip: IpAddr,
        window: Duration,
        now: Instant,
    ) -> bool {
        let mut map = match self.first_seen.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (from.to_ascii_lowercase(), to.to_ascii_lowercase(), ip);
        match map.get(&key) {
            Some(&first) => now.saturating_duration_since(first) < window,
            None => {
                map.insert(key, now);
                true
            }
        }
    }
}

/// A token bucket refilled at `rate_per_sec`, holding at most one second's
/// worth (at least one token).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    capacity: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate_per_sec: f64) -> Self {
        let capacity = rate_per_sec.max(1.0);
        Self {
            rate_per_sec,
            capacity,
            tokens: capacity,
            last: None,
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate_per_sec).min(self.capacity);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn point_of(kind: CommandKind) -> Option<FaultPoint> {
    Some(match kind {
        CommandKind::Connect => FaultPoint::Connect,
        CommandKind::Helo | CommandKind::Ehlo | CommandKind::Lhlo => FaultPoint::Ehlo,
        CommandKind::Mail => FaultPoint::Mail,
        CommandKind::Rcpt => FaultPoint::Rcpt,
        CommandKind::Data => FaultPoint::Data,
        CommandKind::Dot => FaultPoint::Dot,
        CommandKind::Quit => FaultPoint::Quit,
        _ => return None,
    })
}

/// One worker's fault state.
#[derive(Debug)]
pub struct ThreadFaults {
    rules: Vec<FaultSpec>,
    buckets: Vec<Option<TokenBucket>>,
    rng: SplitMix64,
    greylist: Arc<Greylist>,
    /// A `stored=CODE` rule decided the last verdict (read and cleared by
    /// the connection with [`ThreadFaults::take_stored`]).
    stored: bool,
}

impl ThreadFaults {
    /// Rules for worker `index` of `threads`; the PRNG is seeded from `seed`
    /// and `index`.
    pub fn new(
        rules: &[FaultSpec],
        seed: u64,
        index: usize,
        threads: usize,
        greylist: Arc<Greylist>,
    ) -> Self {
        let threads = threads.max(1) as f64;
        let buckets = rules
            .iter()
            .map(|r| match r.action {
                FaultAction::RateLimit { per_sec } => {
                    Some(TokenBucket::new(per_sec as f64 / threads))
                }
                _ => None,
            })
            .collect();
        let mut mix = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let rng = SplitMix64::new(mix.next_u64());
        Self {
            rules: rules.to_vec(),
            buckets,
            rng,
            greylist,
            stored: false,
        }
    }

    /// True if no rule is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a `stored=CODE` rule decided the last verdict; clears it.
    pub fn take_stored(&mut self) -> bool {
        std::mem::take(&mut self.stored)
    }

    /// The verdict for `kind` from a client at `ip`.
    pub fn verdict(
        &mut self,
        kind: CommandKind,
        info: &CommandInfo<'_>,
        ip: IpAddr,
        now: Instant,
    ) -> Verdict {
        if self.rules.is_empty() {
            return Verdict::Proceed;
        }
        let Some(point) = point_of(kind) else {
            return Verdict::Proceed;
        };
        for i in 0..self.rules.len() {
            let rule = self.rules[i];
            if rule.point != point {
                continue;
            }
            if rule.probability < 1.0 && self.rng.next_f64() >= rule.probability {
                continue;
            }
            let v = match rule.action {
                FaultAction::Reply(code) => Verdict::Reply(code),
                FaultAction::Stored(code) => {
                    self.stored = true;
                    Verdict::Reply(code)
                }
                FaultAction::Delay { min, max } => {
                    let span = max.saturating_sub(min);
                    let extra = if span.is_zero() {
                        Duration::ZERO
                    } else {
                        span.mul_f64(self.rng.next_f64())
                    };
                    Verdict::Delay(min + extra)
                }
                FaultAction::Disconnect => Verdict::Disconnect,
                FaultAction::Disconnect421 => Verdict::Disconnect421,
                FaultAction::Greylist { window } => {
                    let from = info.mail_from.unwrap_or_default();
                    let to = info.rcpt_to.unwrap_or_default();
                    let ip = info.peer.map_or(ip, |p| p.ip());
                    if self.greylist.defer(from, to, ip, window, now) {
                        Verdict::Reply(451)
                    } else {
                        continue;
                    }
                }
                FaultAction::RateLimit { .. } => {
                    let limited = self.buckets[i].as_mut().is_some_and(|b| !b.try_take(now));
                    if limited {
                        Verdict::Reply(421)
                    } else {
                        continue;
                    }
                }
            };
            return v;
        }
        Verdict::Proceed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn info<'a>(from: &'a [u8], to: &'a [u8]) -> CommandInfo<'a> {
        CommandInfo {
            arg: b"",
            mail_from: Some(from),
            rcpt_to: Some(to),
            peer: None,
        }
    }

    fn faults(specs: &[&str], seed: u64) -> ThreadFaults {
        let rules: Vec<_> = specs.iter().map(|s| parse_fault(s).unwrap()).collect();
        ThreadFaults::new(&rules, seed, 0, 1, Arc::default())
    }

    #[test]
    fn no_rules_always_proceed() {
        let mut f = faults(&[], 1);
        let now = Instant::now();
        assert_eq!(
            f.verdict(CommandKind::Rcpt, &info(b"a", b"b"), IP, now),
            Verdict::Proceed
        );
    }

    #[test]
    fn same_seed_gives_same_verdicts_and_rate_is_near_probability() {
        let now = Instant::now();
        let run = |seed| {
            let mut f = faults(&["rcpt:451:20%"], seed);
            (0..10_000)
                .map(|_| f.verdict(CommandKind::Rcpt, &info(b"a", b"b"), IP, now))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        let hits = a.iter().filter(|v| **v == Verdict::Reply(451)).count();
        // 10k draws at p = 0.2: sigma = 40; allow 5 sigma.
        assert!((1800..=2200).contains(&hits), "{hits}");
        assert_ne!(a, run(8));
    }

    #[test]
    fn faults_apply_only_to_their_point() {
        let mut f = faults(&["mail:550"], 1);
        let now = Instant::now();
        assert_eq!(
            f.verdict(CommandKind::Rcpt, &info(b"a", b"b"), IP, now),
            Verdict::Proceed
        );
        assert_eq!(
            f.verdict(CommandKind::Mail, &info(b"a", b"b"), IP, now),
            Verdict::Reply(550)
        );
    }

    #[test]
    fn delay_range_stays_within_bounds() {
        let mut f = faults(&["mail:delay=10ms..50ms"], 3);
        let now = Instant::now();
        for _ in 0..1000 {
            match f.verdict(CommandKind::Mail, &info(b"a", b"b"), IP, now) {
                Verdict::Delay(d) => {
                    assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(50))
                }
                v => panic!("{v:?}"),
            }
        }
    }

    #[test]
    fn greylist_defers_first_attempt_and_accepts_retry_after_window() {
        let mut f = faults(&["rcpt:greylist=1s"], 1);
        let t0 = Instant::now();
        let v = |f: &mut ThreadFaults, to: &[u8], t| {
            f.verdict(CommandKind::Rcpt, &info(b"s@x", to), IP, t)
        };
        assert_eq!(v(&mut f, b"r@x", t0), Verdict::Reply(451));
        assert_eq!(
            v(&mut f, b"r@x", t0 + Duration::from_millis(500)),
            Verdict::Reply(451)
        );
        assert_eq!(
            v(&mut f, b"r@x", t0 + Duration::from_millis(1100)),
            Verdict::Proceed
        );
        assert_eq!(
            v(&mut f, b"other@x", t0 + Duration::from_millis(1100)),
            Verdict::Reply(451)
        );
    }

    #[test]
    fn rate_limit_answers_421_past_the_bucket() {
        let mut f = faults(&["connect:ratelimit=3"], 1);
        let t0 = Instant::now();
        let got: Vec<_> = (0..5)
            .map(|_| f.verdict(CommandKind::Connect, &info(b"", b""), IP, t0))
            .collect();
        assert_eq!(&got[..3], &[Verdict::Proceed; 3]);
        assert_eq!(&got[3..], &[Verdict::Reply(421); 2]);
        // One second later the bucket is full again.
        assert_eq!(
            f.verdict(
                CommandKind::Connect,
                &info(b"", b""),
                IP,
                t0 + Duration::from_secs(1)
            ),
            Verdict::Proceed
        );
    }

    #[test]
    fn fault_specs_from_the_design() {
        let f = parse_fault("rcpt:451:5%").unwrap();
        assert_eq!(
            (f.point, f.action, f.probability),
            (FaultPoint::Rcpt, FaultAction::Reply(451), 0.05)
        );
        let f = parse_fault("data:disconnect:1%").unwrap();
        assert_eq!(f.action, FaultAction::Disconnect);
        let f = parse_fault("ehlo:delay=200ms").unwrap();
        assert_eq!(f.probability, 1.0);
        assert_eq!(
            f.action,
            FaultAction::Delay {
                min: Duration::from_millis(200),
                max: Duration::from_millis(200)
            }
        );
        let f = parse_fault("rcpt:greylist").unwrap();
        assert!(matches!(f.action, FaultAction::Greylist { .. }));
        let f = parse_fault("connect:ratelimit=100").unwrap();
        assert_eq!(f.action, FaultAction::RateLimit { per_sec: 100 });
        assert!(parse_fault("rcpt:250:5%")
            .unwrap_err()
            .contains("4xx or 5xx"));
        assert!(parse_fault("banana:451")
            .unwrap_err()
            .contains("unknown point"));
        assert!(parse_fault("mail:greylist").is_err());
    }
}
