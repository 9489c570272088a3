//! `--scenario FILE.toml`: mixed traffic. The file holds weighted
//! profiles; each session takes one, chosen by weight from the seeded
//! generator, and every profile shares the run's one schedule (open loop)
//! or connection cap (closed loop).
//!
//! ```toml
//! [[profile]]
//! name = "small"               # letters, digits, `_` and `-`
//! weight = 3                   # any positive number; shares are weight / sum
//! size = "1KiB:80%,16KiB:20%"  # as --size: one size, a range, a distribution
//! recipients = 1               # as --recipients
//! messages_per_session = 5     # as -k
//! tls = "starttls"             # none | starttls | implicit
//! bdat = false                 # as --bdat
//! ```
//!
//! A key a profile leaves out takes the command line's value. A bad file
//! is refused in one line naming the file, the line and what was expected.
//!
//! Invariants: a [`Scenario`] has at least one profile, unique names and
//! positive weights; a draw takes one `u64` from the caller's generator;
//! nothing here runs on the hot path of a run without `--scenario`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use super::body::{Body, Rng};
use super::config::BlastConfig;
use super::conn::ConnConfig;
use super::message::MessageBuilder;
use super::size::{parse_size_spec, SizeSpec};
use crate::smtp::client::Message;
use crate::stats::recorder::Measurements;
use crate::stats::report::{ProfileReport, ReportError};

/// A profile's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

/// One profile, with the command line's values filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub weight: f64,
    pub size: SizeSpec,
    pub recipients: u64,
    pub messages_per_session: u64,
    pub tls: TlsMode,
    pub bdat: bool,
}

/// What a profile that leaves a key out takes (the command line's values).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub size: SizeSpec,
    pub recipients: u64,
    pub messages_per_session: u64,
    pub tls: TlsMode,
    pub bdat: bool,
}

/// A loaded scenario.
#[derive(Debug)]
pub struct Scenario {
    /// The file, as given.
    pub path: String,
    pub profiles: Vec<Profile>,
    /// Cumulative shares; the last is 1.
    cum: Vec<f64>,
    /// Per profile, the body its messages share (built by [`Self::prepare`]).
    shared: OnceLock<Vec<Option<Arc<Body>>>>,
}

/// `size` in a file: parsed as `--size` is, its error carrying the span.
#[derive(Debug)]
struct SizeValue(SizeSpec);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size_spec(&s)
            .map(SizeValue)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProfile {
    name: toml::Spanned<String>,
    weight: toml::Spanned<f64>,
    size: Option<SizeValue>,
    recipients: Option<toml::Spanned<u64>>,
    messages_per_session: Option<toml::Spanned<u64>>,
    tls: Option<TlsMode>,
    bdat: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    profile: Vec<FileProfile>,
}

/// 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Scenario {
    /// Reads and checks `path`.
    pub fn load(path: &Path, defaults: &Defaults) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--scenario {}: {e}", path.display()))?;
        Self::parse(&path.display().to_string(), &text, defaults)
    }

    /// Parses the text of file `path`.
    pub fn parse(path: &str, text: &str, defaults: &Defaults) -> Result<Self, String> {
        let at = |span: std::ops::Range<usize>, what: String| {
            format!("--scenario {path}:{}: {what}", line_of(text, span.start))
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let what = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(s) => at(s, what),
                None => format!("--scenario {path}: {what}"),
            }
        })?;
        if file.profile.is_empty() {
            return Err(format!(
                "--scenario {path}: expected at least one [[profile]] with a name and a weight"
            ));
        }
        let mut profiles: Vec<Profile> = Vec::with_capacity(file.profile.len());
        for p in file.profile {
            let name = p.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(at(
                    p.name.span(),
                    format!(
                        "expected a profile name of letters, digits, `_` and `-`, got `{name}`"
                    ),
                ));
            }
            if profiles.iter().any(|q| &q.name == name) {
                return Err(at(
                    p.name.span(),
                    format!("expected unique profile names, `{name}` is taken"),
                ));
            }
            let weight = *p.weight.get_ref();
            if !(weight.is_finite() && weight > 0.0) {
                return Err(at(
                    p.weight.span(),
                    format!("expected a positive weight, got {weight}"),
                ));
            }
            let positive = |v: Option<toml::Spanned<u64>>, key: &str, default: u64| match v {
                None => Ok(default),
                Some(s) if *s.get_ref() >= 1 => Ok(*s.get_ref()),
                Some(s) => Err(at(s.span(), format!("expected {key} of at least 1, got 0"))),
            };
            profiles.push(Profile {
                name: name.clone(),
                weight,
                size: p.size.map_or_else(|| defaults.size.clone(), |s| s.0),
                recipients: positive(p.recipients, "recipients", defaults.recipients)?,
                messages_per_session: positive(
                    p.messages_per_session,
                    "messages_per_session",
                    defaults.messages_per_session,
                )?,
                tls: p.tls.unwrap_or(defaults.tls),
                bdat: p.bdat.unwrap_or(defaults.bdat),
            });
        }
        let total: f64 = profiles.iter().map(|p| p.weight).sum();
        let mut acc = 0.0;
        let mut cum: Vec<f64> = profiles
            .iter()
            .map(|p| {
                acc += p.weight / total;
                acc
            })
            .collect();
        if let Some(last) = cum.last_mut() {
            *last = 1.0;
        }
        Ok(Scenario {
            path: path.to_string(),
            profiles,
            cum,
            shared: OnceLock::new(),
        })
    }

    /// The index of a profile drawn by weight (one draw from `rng`).
    pub fn pick(&self, rng: &mut Rng) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cum
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cum.len() - 1)
    }

    /// Whether any profile speaks TLS.
    pub fn uses_tls(&self) -> bool {
        self.profiles.iter().any(|p| p.tls != TlsMode::None)
    }

    /// The scenario as the JSON report echoes it.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::json!({
            "file": self.path,
            "profiles": self.profiles.iter().map(|p| serde_json::json!({
                "name": p.name,
                "weight": p.weight,
                "size": p.size.echo(),
                "recipients": p.recipients,
                "messages_per_session": p.messages_per_session,
                "tls": format!("{:?}", p.tls).to_lowercase(),
                "bdat": p.bdat,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One worker thread's side of a scenario: per profile the connection
/// settings and the message builder, the profile of each connection, and
/// the generator that picks a profile per session.
pub struct ScenarioRun {
    scenario: Arc<Scenario>,
    rng: Rng,
    /// Per profile: what its connections share.
    pub conn_cfgs: Vec<ConnConfig>,
    builders: Vec<MessageBuilder>,
    /// Messages this thread built over every profile (`{n}` stays unique).
    built: u64,
    /// Per connection (by `ConnId`): its profile.
    conn_profile: Vec<u16>,
}

impl ScenarioRun {
    /// Thread `thread` of `threads`; `base`: the run's connection settings,
    /// which each profile adjusts.
    pub fn new(
        cfg: &BlastConfig,
        scenario: &Arc<Scenario>,
        base: &ConnConfig,
        thread: usize,
        threads: usize,
    ) -> Self {
        let builders = scenario
            .profiles
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut b = profile_builder(cfg, p, thread, threads);
                if let Some(body) = scenario.shared.get().and_then(|s| s[i].clone()) {
                    b.use_shared_body(body);
                }
                b
            })
            .collect();
        let conn_cfgs = scenario
            .profiles
            .iter()
            .map(|p| {
                let mut client = (*base.client).clone();
                client.starttls = p.tls == TlsMode::Starttls;
                client.bdat = p.bdat;
                ConnConfig {
                    client: Arc::new(client),
                    implicit_tls: p.tls == TlsMode::Implicit,
                    messages_per_session: p.messages_per_session,
                    ..base.clone()
                }
            })
            .collect();
        ScenarioRun {
            scenario: Arc::clone(scenario),
            rng: Rng::new(
                (cfg.seed ^ 0x5CE7_A210_0F11_E5A5)
                    .wrapping_mul(0x100_0000_01B3)
                    .wrapping_add(thread as u64 + 1),
            ),
            conn_cfgs,
            builders,
            built: 0,
            conn_profile: Vec::new(),
        }
    }

    /// The profile of the next session, drawn by weight.
    pub fn pick(&mut self) -> usize {
        self.scenario.pick(&mut self.rng)
    }

    /// `-k` of profile `p`.
    pub fn messages_per_session(&self, p: usize) -> u64 {
        self.conn_cfgs[p].messages_per_session
    }

    /// The next message of profile `p`.
    pub fn next_message(&mut self, p: usize) -> Message {
        let b = &mut self.builders[p];
        b.continue_from(self.built);
        self.built += 1;
        b.next_message()
    }

    /// Connection `id` carries a session of profile `p`.
    pub fn set_profile(&mut self, id: usize, p: usize) {
        if self.conn_profile.len() <= id {
            self.conn_profile.resize(id + 1, 0);
        }
        self.conn_profile[id] = p as u16;
    }

    /// The profile of connection `id`.
    pub fn profile_of(&self, id: usize) -> usize {
        self.conn_profile.get(id).map_or(0, |&p| usize::from(p))
    }
}

/// The message builder of profile `p` on thread `thread` of `threads`.
fn profile_builder(
    cfg: &BlastConfig,
    p: &Profile,
    thread: usize,
    threads: usize,
) -> MessageBuilder {
    MessageBuilder::new(
        cfg.from.clone(),
        cfg.to.clone(),
        p.recipients,
        p.size.range,
        cfg.body_file.clone(),
        cfg.seed,
        thread,
        threads,
        cfg.instance,
    )
    .with_corpus(cfg.corpus.clone())
    .with_size_dist(p.size.dist.clone())
}

impl Scenario {
    /// Builds the bodies every thread shares (a fixed size, the sizes of
    /// a distribution) once, before the run's clock starts.
    pub fn prepare(&self, cfg: &BlastConfig, threads: usize) {
        self.shared.get_or_init(|| {
            self.profiles
                .iter()
                .map(|p| profile_builder(cfg, p, 0, threads).shared_body())
                .collect()
        });
    }

    /// Each profile's report, from the workers' per-profile measurements
    /// (`per_worker[w][p]`).
    pub fn reports(
        &self,
        per_worker: &[&[Measurements]],
    ) -> Result<BTreeMap<String, ProfileReport>, ReportError> {
        let mut out = BTreeMap::new();
        for (i, p) in self.profiles.iter().enumerate() {
            let mut m = Measurements::default();
            for w in per_worker {
                if let Some(x) = w.get(i) {
                    m.merge(x);
                }
            }
            out.insert(p.name.clone(), ProfileReport::of(&m)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            size: parse_size_spec("1KiB").unwrap(),
            recipients: 1,
            messages_per_session: 1,
            tls: TlsMode::None,
            bdat: false,
        }
    }

    const MIX: &str = r#"
[[profile]]
name = "small"
weight = 3
size = "1KiB:80%,16KiB:20%"
messages_per_session = 5

[[profile]]
name = "big-tls"
weight = 1
size = "64KiB"
recipients = 3
tls = "starttls"
bdat = true
"#;

    #[test]
    fn a_scenario_reads_its_profiles_and_fills_the_rest_from_the_command_line() {
        let s = Scenario::parse("mix.toml", MIX, &defaults()).unwrap();
        assert_eq!(s.profiles.len(), 2);
        let (a, b) = (&s.profiles[0], &s.profiles[1]);
        assert_eq!(
            (
                a.name.as_str(),
                a.weight,
                a.recipients,
                a.messages_per_session
            ),
            ("small", 3.0, 1, 5)
        );
        assert_eq!(a.size.dist.as_ref().unwrap().sizes(), &[1024, 16384]);
        assert_eq!((a.tls, a.bdat), (TlsMode::None, false));
        assert_eq!(
            (b.name.as_str(), b.recipients, b.messages_per_session),
            ("big-tls", 3, 1)
        );
        assert_eq!((b.size.range.min, b.size.range.max), (65536, 65536));
        assert_eq!((b.tls, b.bdat), (TlsMode::Starttls, true));
        assert!(s.uses_tls());
        assert_eq!(s.echo()["profiles"][1]["tls"], "starttls");
    }

    #[test]
    fn profiles_are_drawn_by_weight_and_seed() {
        let s = Scenario::parse("mix.toml", MIX, &defaults()).unwrap();
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            let mut n = [0u64; 2];
            for _ in 0..100_000 {
                n[s.pick(&mut rng)] += 1;
            }
            n
        };
        let n = draws(7);
        let share = n[0] as f64 / 100_000.0;
        assert!((share - 0.75).abs() < 0.01, "{share}");
        assert_eq!(draws(7), n);
    }

    #[test]
    fn a_bad_file_names_the_file_the_line_and_what_was_expected() {
        let cases = [
            // (text, line, words the message must hold)
            (
                "[[profile]]\nname = \"a\"\nweight = 1\ntls = \"ssl\"\n",
                4,
                "none",
            ),
            (
                "[[profile]]\nname = \"a\"\nweight = 1\nsize = \"1KiB:50%\"\n",
                4,
                "SIZE:WEIGHT%",
            ),
            (
                "[[profile]]\nname = \"a\"\nweight = 0\n",
                3,
                "positive weight",
            ),
            (
                "[[profile]]\nname = \"a b\"\nweight = 1\n",
                2,
                "profile name",
            ),
            (
                "[[profile]]\nname = \"a\"\nweight = 1\ncolour = 2\n",
                4,
                "colour",
            ),
            (
                "[[profile]]\nname = \"a\"\nweight = 1\n\n[[profile]]\nname = \"a\"\nweight = 1\n",
                6,
                "unique",
            ),
            (
                "[[profile]]\nname = \"a\"\nweight = 1\nrecipients = 0\n",
                4,
                "at least 1",
            ),
            ("[[profile]]\nname = \"a\"\nweight = = 1\n", 3, ""),
        ];
        for (text, line, words) in cases {
            let e = Scenario::parse("s.toml", text, &defaults()).expect_err(text);
            assert!(
                e.starts_with(&format!("--scenario s.toml:{line}: ")),
                "{text:?}: {e}"
            );
            assert!(e.contains(words), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = Scenario::parse("s.toml", "# nothing\n", &defaults()).unwrap_err();
        assert!(e.contains("at least one [[profile]]"), "{e}");
    }
}
