//! rustls configuration for both roles, and what a finished handshake tells us.
//!
//! Server side: [`server_config`] loads a PEM certificate chain and key, or,
//! when none is given, generates a self-signed certificate in memory (for
//! `localhost`, `127.0.0.1` and `::1`) and says so through
//! [`ServerTls::self_signed`] so the caller can print a note on stderr.
//!
//! Client side: [`client_config`] builds a config that by default does **not
//! verify** the server certificate ([`NoVerify`]: load-testing targets
//! usually present self-signed certificates), or verifies against the CA
//! certificates of a PEM file. Session resumption is on (an in-memory cache
//! shared by every connection made from the same `Arc<ClientConfig>`) or off.
//!
//! All configs use the aws-lc-rs provider, which [`install_crypto_provider`]
//! also installs as the process default (idempotent). [`TlsInfo`] describes a
//! connection once its handshake is done; the peer certificate is parsed with
//! x509-parser, and a certificate that does not parse only leaves those fields
//! empty.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, ServerConfig,
    SignatureScheme,
};
use thiserror::Error;

/// Errors building TLS configurations.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds no usable item.
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        /// "certificate chain", "private key" or "CA certificates".
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(String),
    /// rustls rejected the configuration (e.g. key does not match certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name `{0}`: expected a DNS name or an IP address")]
    ServerName(String),
}

/// The provider every config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-default crypto provider. Idempotent;
/// losing a race to another installer is fine.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// A server config and whether its certificate was generated in memory.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The config, shared by every connection.
    pub config: Arc<ServerConfig>,
    /// True if no certificate was given and a self-signed one was generated.
    pub self_signed: bool,
}

fn read_pem_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Server config from PEM files (`cert_key = Some((chain, key))`) or, with
/// `None`, from a fresh self-signed certificate for localhost.
pub fn server_config(cert_key: Option<(&Path, &Path)>) -> Result<ServerTls, TlsError> {
    install_crypto_provider();
    let (chain, key, self_signed) = match cert_key {
        Some((cert_path, key_path)) => {
            let chain = read_pem_certs(cert_path, "certificate chain")?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Pem {
                what: "private key",
                path: key_path.display().to_string(),
                reason: e.to_string(),
            })?;
            (chain, key, false)
        }
        None => {
            let (chain, key) = self_signed_cert()?;
            (chain, key, true)
        }
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(ServerTls {
        config: Arc::new(config),
        self_signed,
    })
}

/// A self-signed certificate (and its PKCS#8 key) for `localhost`,
/// `127.0.0.1` and `::1`, generated in memory.
pub fn self_signed_cert() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError>
{
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let err = |e: rcgen::Error| TlsError::SelfSigned(e.to_string());
    let signing_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(err)?;
    // Say what it is: `probe` and `openssl s_client` print the subject.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "smtpstorm self-signed (localhost)");
    let cert = params.self_signed(&signing_key).map_err(err)?.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    Ok((vec![cert], key))
}

/// How the client checks the server's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ClientVerify {
    /// Accept any certificate ([`NoVerify`]). For test targets only.
    #[default]
    Off,
    /// Verify the chain and name against the CA certificates in this PEM file.
    CaFile(std::path::PathBuf),
}

/// Client config. `resumption_sessions = 0` disables session resumption;
/// otherwise up to that many sessions are cached in memory and shared by every
/// connection built from the returned config.
pub fn client_config(
    verify: &ClientVerify,
    resumption_sessions: usize,
) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let mut config = match verify {
        ClientVerify::Off => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify { provider }))
            .with_no_client_auth(),
        ClientVerify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_pem_certs(path, "CA certificates")? {
                roots.add(cert).map_err(TlsError::Config)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.resumption = if resumption_sessions == 0 {
        rustls::client::Resumption::disabled()
    } else {
        rustls::client::Resumption::in_memory_sessions(resumption_sessions)
    };
    Ok(Arc::new(config))
}

/// Parses a `--tls-sni`/target host into a rustls server name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// A certificate verifier that accepts **any** server certificate.
///
/// Meant for load-testing targets with self-signed certificates: it gives no
/// protection against an active attacker. Handshake signatures are still
/// checked (so the peer must hold the key of the certificate it presented);
/// only the chain of trust and the name are skipped.
#[derive(Debug)]
pub struct NoVerify {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a connection negotiated, for `probe` output and JSON reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// E.g. `TLSv1_3`.
    pub protocol: String,
    /// E.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// True if the session was resumed (no full handshake).
    pub resumed: bool,
    /// The peer's end-entity certificate subject (RFC 4514 string), if any.
    pub peer_subject: Option<String>,
    /// Its issuer.
    pub peer_issuer: Option<String>,
    /// Its expiry, RFC 2822 style as x509-parser prints it.
    pub peer_not_after: Option<String>,
    /// Its expiry as Unix seconds.
    pub peer_not_after_unix: Option<i64>,
}

impl TlsInfo {
    /// Describes `conn`; `None` while the handshake is still in progress.
    pub fn from_connection(conn: &rustls::Connection) -> Option<TlsInfo> {
        if conn.is_handshaking() {
            return None;
        }
        let protocol = conn
            .protocol_version()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{v:?}"))
            })
            .unwrap_or_default();
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .map(|s| {
                s.suite()
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{:?}", s.suite()))
            })
            .unwrap_or_default();
        let mut info = TlsInfo {
            protocol,
            cipher_suite,
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            ..TlsInfo::default()
        };
        if let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) {
            info.set_peer_cert(cert.as_ref());
        }
        Some(info)
    }

    /// Fills the peer-certificate fields from a DER certificate; leaves them
    /// empty if it does not parse.
    pub fn set_peer_cert(&mut self, der: &[u8]) {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            self.peer_subject = Some(cert.subject().to_string());
            self.peer_issuer = Some(cert.issuer().to_string());
            let not_after = cert.validity().not_after;
            self.peer_not_after = Some(not_after.to_string());
            self.peer_not_after_unix = Some(not_after.timestamp());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_server_config_says_so() {
        let tls = server_config(None).unwrap();
        assert!(tls.self_signed);
    }

    #[test]
    fn pem_files_round_trip_into_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, certified.cert.pem()).unwrap();
        std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
        let tls = server_config(Some((&cert_path, &key_path))).unwrap();
        assert!(!tls.self_signed);
        // The same PEM works as a CA file for the verifying client.
        client_config(&ClientVerify::CaFile(cert_path.clone()), 0).unwrap();
    }

    #[test]
    fn missing_or_empty_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");
        let err = server_config(Some((&missing, &missing)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("certificate chain") && err.contains("missing.pem"),
            "{err}"
        );
        let err = server_config(Some((&empty, &empty)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");
    }

    #[test]
    fn peer_certificate_fields_are_parsed() {
        let (chain, _) = self_signed_cert().unwrap();
        let mut info = TlsInfo::default();
        info.set_peer_cert(chain[0].as_ref());
        assert!(
            info.peer_subject.as_deref().unwrap().contains("smtpstorm self-signed"),
            "{info:?}"
        );
        assert!(info.peer_not_after_unix.unwrap() > 0);
        let mut garbage = TlsInfo::default();
        garbage.set_peer_cert(b"not a certificate");
        assert_eq!(garbage, TlsInfo::default());
    }

    #[test]
    fn server_names_accept_hosts_and_ips() {
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("bad name!").is_err());
    }

    #[test]
    fn installing_the_provider_twice_is_harmless() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
