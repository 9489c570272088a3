//! `smtpstorm probe`: its flags and their validation into a [`ProbeConfig`]
//! (the target resolved, `--auth` with its mechanism).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::blast::{resolve_target, unix_target, AuthMechArg, ConfigError};
use super::parse::{parse_duration, parse_user_pass};
use crate::blast::probe::ProbeConfig;
use crate::smtp::client::ClientAuth;

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// host:port (port 25 if omitted), or unix:/path.
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Upgrade with STARTTLS.
    #[arg(long, conflicts_with = "tls")]
    pub starttls: bool,
    /// Implicit TLS (465-style; swaks calls it --tls-on-connect).
    #[arg(long, visible_alias = "tls-on-connect")]
    pub tls: bool,
    /// Authenticate as USER:PASS.
    #[arg(long, value_name = "USER:PASS", value_parser = parse_user_pass)]
    pub auth: Option<(String, String)>,
    #[arg(long, value_name = "MECH", default_value = "plain")]
    pub auth_mech: AuthMechArg,
    #[arg(long, value_name = "NAME", default_value = "smtpstorm.localhost")]
    pub helo: String,
    /// Timeout of each step.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the findings as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Validates `args` into a probe (the target is resolved here).
pub fn config(args: &ProbeArgs) -> Result<ProbeConfig, ConfigError> {
    let (target, target_host, unix) = match unix_target(&args.target) {
        Some(u) => u.map(|(path, addr, host)| (addr, host, Some(path)))?,
        None => resolve_target(&args.target).map(|(addr, host)| (addr, host, None))?,
    };
    Ok(ProbeConfig {
        target,
        unix,
        target_host,
        starttls: args.starttls,
        implicit_tls: args.tls,
        helo: args.helo.clone(),
        auth: args.auth.as_ref().map(|(user, pass)| ClientAuth {
            mech: args.auth_mech.mech(),
            user: user.clone(),
            pass: pass.clone(),
        }),
        timeout: args.timeout,
        json: args.json.clone(),
    })
}
