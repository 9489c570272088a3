//! `--scenario FILE.toml` read against the rest of the command line: the
//! profiles' missing keys take the values of `--size`, `--recipients`,
//! `-k`, `--starttls`/`--tls` and `--bdat` (the file format is in
//! `blast::scenario`).

use std::sync::Arc;

use super::blast::LoadArgs;
use crate::blast::scenario::{Defaults, Scenario, TlsMode};

/// The scenario of `load`, if it names one; the error is one line naming
/// the file, the line and what was expected.
pub fn load(load: &LoadArgs) -> Result<Option<Arc<Scenario>>, String> {
    let Some(path) = &load.scenario else {
        return Ok(None);
    };
    let defaults = Defaults {
        size: load.size.clone(),
        recipients: load.recipients,
        messages_per_session: load.messages_per_session,
        tls: if load.tls {
            TlsMode::Implicit
        } else if load.starttls {
            TlsMode::Starttls
        } else {
            TlsMode::None
        },
        bdat: load.bdat,
    };
    Scenario::load(path, &defaults).map(|s| Some(Arc::new(s)))
}
