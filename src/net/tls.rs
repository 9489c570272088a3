//! rustls configuration for both roles, and what a finished handshake tells us.
//!
//! Server side: [`server_config`] loads a PEM certificate chain and key, or,
//! when none is given, generates a self-signed certificate in memory (for
//! `localhost`, `127.0.0.1` and `::1`) and says so through
//! [`ServerTls::self_signed`] so the caller can print a note on stderr.
//!
//! Client side: [`client_config`] builds a config that by default does **not
//! verify** the server certificate ([`NoVerify`]: load-testing targets
//! usually present self-signed, expired or X.509 v1 certificates), or
//! verifies against the CA certificates of a PEM file. Session resumption is
//! on (an in-memory cache shared by every connection made from the same
//! `Arc<ClientConfig>`) or off.
//!
//! Invariants:
//! - Without verification, any certificate the handshake can use works: the
//!   certificate is never parsed as a whole (webpki refuses v1), only its
//!   SubjectPublicKeyInfo is taken out ([`certificate_spki`]), and the
//!   handshake signature is still checked against that key, so the peer must
//!   hold the key of the certificate it presented. The server side loads
//!   its own certificate the same way (and checks that the key matches it).
//! - Building any config seeds the crypto library's random generator
//!   ([`install_crypto_provider`]): aws-lc gathers CPU-jitter entropy once per
//!   process on its first random draw (40–90 ms of CPU), which must never
//!   land inside a measured handshake.
//!
//! All configs use the aws-lc-rs provider, which [`install_crypto_provider`]
//! also installs as the process default (idempotent). [`TlsInfo`] describes a
//! connection once its handshake is done; the peer certificate's subject,
//! issuer and expiry are read by [`der`], and a field that does not parse is
//! left empty.

mod der;

use std::path::Path;
use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, HandshakeKind, OtherError,
    PeerMisbehaved, RootCertStore, ServerConfig, SignatureScheme, SupportedCipherSuite,
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
    /// The first certificate of a chain has no readable public key.
    #[error("cannot read the public key of the certificate in {0}: not a DER X.509 certificate")]
    Certificate(String),
    /// The private key is not the one of the certificate.
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// Verification (`--tls-verify`) met a certificate older than X.509 v3.
    #[error(
        "the server's certificate is X.509 version {0}, which verification cannot check \
         (it needs version 3); without --tls-verify it is used unverified"
    )]
    UnverifiableVersion(u32),
}

/// The provider every config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Which cipher suites and key-exchange groups one side uses, in preference
/// order (`--tls-suites`, `--tls-groups`). An empty list keeps the default:
/// for a client, rustls' own offer (what a rustls-based client sends); for
/// a server, every suite, cheapest on this CPU first ([`server_suite_order`]).
#[derive(Clone, Debug, Default)]
pub struct TlsChoice {
    /// Cipher suites, most preferred first.
    pub suites: Vec<SupportedCipherSuite>,
    /// Key-exchange groups, most preferred first.
    pub groups: Vec<&'static dyn SupportedKxGroup>,
}

/// The name of a suite as rustls spells it (`TLS13_AES_128_GCM_SHA256`).
pub fn suite_name(s: SupportedCipherSuite) -> String {
    let id = s.suite();
    id.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{id:?}"))
}

/// The name of a key-exchange group as rustls spells it (`X25519`).
pub fn group_name(g: &dyn SupportedKxGroup) -> String {
    let id = g.name();
    id.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{id:?}"))
}

/// Names compared loosely: case, `-` and `_` do not matter, and the IANA /
/// OpenSSL spelling of a TLS 1.3 suite (`TLS_AES_128_GCM_SHA256`) means
/// rustls' `TLS13_AES_128_GCM_SHA256`; `P-256`/`P-384` name the curves.
fn loose(name: &str) -> String {
    let n: String = name
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    match n.as_str() {
        "P256" | "PRIME256V1" => "SECP256R1".into(),
        "P384" => "SECP384R1".into(),
        _ => match n.strip_prefix("TLS") {
            Some(rest) if !rest.starts_with("13") && !rest.starts_with("ECDHE") => {
                format!("TLS13{rest}")
            }
            _ => n,
        },
    }
}

/// Parses a comma-separated list against `all`; an unknown name is one line
/// that lists the valid ones. Duplicates are dropped; the list may not be
/// empty.
fn parse_list<T: Copy>(
    list: &str,
    what: &str,
    all: &[T],
    name: impl Fn(T) -> String,
) -> Result<Vec<T>, String> {
    let valid = || all.iter().map(|t| name(*t)).collect::<Vec<_>>().join(", ");
    let mut out: Vec<T> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found = all
            .iter()
            .copied()
            .find(|t| loose(&name(*t)) == loose(item))
            .ok_or_else(|| format!("unknown TLS {what} `{item}`; valid: {}", valid()))?;
        if !out.iter().any(|t| name(*t) == name(found)) {
            out.push(found);
        }
    }
    if out.is_empty() {
        return Err(format!("empty list of TLS {what}s; valid: {}", valid()));
    }
    Ok(out)
}

/// Parses `--tls-suites` (comma-separated, most preferred first).
pub fn parse_suites(list: &str) -> Result<Vec<SupportedCipherSuite>, String> {
    parse_list(
        list,
        "cipher suite",
        rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES,
        suite_name,
    )
}

/// Parses `--tls-groups` (comma-separated, most preferred first).
pub fn parse_groups(list: &str) -> Result<Vec<&'static dyn SupportedKxGroup>, String> {
    parse_list(
        list,
        "key-exchange group",
        rustls::crypto::aws_lc_rs::ALL_KX_GROUPS,
        group_name,
    )
}

/// True if this CPU has AES and carry-less multiply instructions (AES-GCM
/// in hardware); without them ChaCha20-Poly1305 is the cheaper cipher.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Every suite the provider enables by default, cheapest on this CPU first:
/// what an SMTP session pays for is mostly its handshake, whose transcript
/// hash and key schedule run on the suite's hash, so SHA-256 suites come
/// before SHA-384 ones (aws-lc has SHA-256 in hardware on x86 CPUs with the
/// SHA extensions and only a portable SHA-512 on AMD ones); then AES-128
/// before AES-256 (fewer rounds), and AES-GCM before ChaCha20-Poly1305 when
/// the CPU has AES instructions (after it when not); TLS 1.3 before 1.2.
pub fn server_suite_order() -> Vec<SupportedCipherSuite> {
    let aes = aes_in_hardware();
    let mut suites = provider().cipher_suites.clone();
    suites.sort_by_key(|s| {
        let name = suite_name(*s);
        let tls12 = name.starts_with("TLS_");
        let sha384 = name.ends_with("SHA384");
        let cipher = match (name.contains("CHACHA20"), name.contains("AES_256"), aes) {
            (false, false, true) => 0,
            (true, _, true) => 1,
            (false, true, true) => 2,
            (true, _, false) => 0,
            (false, false, false) => 1,
            (false, true, false) => 2,
        };
        (tls12, sha384, cipher)
    });
    suites
}

/// The provider with `choice` applied; for a server with no suites chosen,
/// [`server_suite_order`]. TLS 1.3 suites run their key schedule on
/// [`PadHkdf`] (same results, fewer hash compressions).
fn provider_for(choice: &TlsChoice, server: bool) -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    if !choice.suites.is_empty() {
        p.cipher_suites = choice.suites.clone();
    } else if server {
        p.cipher_suites = server_suite_order();
    }
    for s in &mut p.cipher_suites {
        *s = with_pad_hkdf(*s);
    }
    if !choice.groups.is_empty() {
        p.kx_groups = choice.groups.clone();
    }
    p
}

/// HMAC whose key's inner and outer pads are hashed once, when the key is
/// made, so that each tag costs two hash compressions (for short input)
/// instead of four: aws-lc's `HKDF_expand`, which rustls' aws-lc-rs suites
/// call for every `HKDF-Expand-Label`, sets the key up again each time,
/// and a TLS 1.3 key schedule expands most of its secrets two to four
/// times (traffic key and IV, the next secrets). Same output: RFC 5869
/// HKDF on RFC 2104 HMAC either way (rustls' own `HkdfUsingHmac`).
struct PadHmac(aws_lc_rs::hmac::Algorithm);

struct PadHmacKey(aws_lc_rs::hmac::Key);

impl rustls::crypto::hmac::Hmac for PadHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn rustls::crypto::hmac::Key> {
        Box::new(PadHmacKey(aws_lc_rs::hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

impl rustls::crypto::hmac::Key for PadHmacKey {
    fn sign_concat(
        &self,
        first: &[u8],
        middle: &[&[u8]],
        last: &[u8],
    ) -> rustls::crypto::hmac::Tag {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(first);
        for d in middle {
            ctx.update(d);
        }
        ctx.update(last);
        rustls::crypto::hmac::Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static PAD_HMAC_SHA256: PadHmac = PadHmac(aws_lc_rs::hmac::HMAC_SHA256);
static PAD_HMAC_SHA384: PadHmac = PadHmac(aws_lc_rs::hmac::HMAC_SHA384);
static PAD_HKDF_SHA256: rustls::crypto::tls13::HkdfUsingHmac<'static> =
    rustls::crypto::tls13::HkdfUsingHmac(&PAD_HMAC_SHA256);
static PAD_HKDF_SHA384: rustls::crypto::tls13::HkdfUsingHmac<'static> =
    rustls::crypto::tls13::HkdfUsingHmac(&PAD_HMAC_SHA384);

/// `s` with its key schedule on [`PadHmac`] (TLS 1.3 suites of SHA-256
/// and SHA-384; anything else as it is). Made once per suite per process.
fn with_pad_hkdf(s: SupportedCipherSuite) -> SupportedCipherSuite {
    use rustls::crypto::hash::HashAlgorithm;
    static MADE: std::sync::OnceLock<Vec<SupportedCipherSuite>> = std::sync::OnceLock::new();
    let made = MADE.get_or_init(|| {
        rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .filter_map(|s| {
                let base = s.tls13()?;
                let hkdf: &'static dyn rustls::crypto::tls13::Hkdf =
                    match base.common.hash_provider.algorithm() {
                        HashAlgorithm::SHA256 => &PAD_HKDF_SHA256,
                        HashAlgorithm::SHA384 => &PAD_HKDF_SHA384,
                        _ => return None,
                    };
                let suite: &'static rustls::Tls13CipherSuite =
                    Box::leak(Box::new(rustls::Tls13CipherSuite {
                        common: rustls::crypto::CipherSuiteCommon {
                            suite: base.common.suite,
                            hash_provider: base.common.hash_provider,
                            confidentiality_limit: base.common.confidentiality_limit,
                        },
                        hkdf_provider: hkdf,
                        aead_alg: base.aead_alg,
                        quic: base.quic,
                    }));
                Some(SupportedCipherSuite::Tls13(suite))
            })
            .collect()
    });
    made.iter()
        .copied()
        .find(|m| m.suite() == s.suite())
        .unwrap_or(s)
}

/// Installs aws-lc-rs as the process-default crypto provider and seeds its
/// random generator. Idempotent; losing a race to another installer is fine.
///
/// aws-lc seeds its generator on the first random draw of the process from
/// CPU-jitter entropy, 40–90 ms of CPU: drawn here, while configs are
/// built, it never stalls the first handshake (and every session of the
/// event loop that makes it) inside a measured phase.
pub fn install_crypto_provider() {
    static SEEDED: Once = Once::new();
    if CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    SEEDED.call_once(|| {
        let mut seed = [0u8; 32];
        // A failure here would fail the first handshake too, with a message.
        let _ = provider().secure_random.fill(&mut seed);
    });
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
/// `None`, from a fresh self-signed certificate for localhost. Any X.509
/// version works (v1 included); the key must be the certificate's.
///
/// The server picks the suite by its own order ([`TlsChoice::suites`], by
/// default [`server_suite_order`]: cheapest on this CPU first) among those
/// the client offers, not by the client's; the group is the client's first
/// one among [`TlsChoice::groups`]. One TLS 1.3 ticket is sent per
/// handshake (rustls sends two by default; a client resumes with one).
pub fn server_config(
    cert_key: Option<(&Path, &Path)>,
    choice: &TlsChoice,
) -> Result<ServerTls, TlsError> {
    install_crypto_provider();
    let (chain, key, self_signed, origin) = match cert_key {
        Some((cert_path, key_path)) => {
            let chain = read_pem_certs(cert_path, "certificate chain")?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Pem {
                what: "private key",
                path: key_path.display().to_string(),
                reason: e.to_string(),
            })?;
            let origin = (
                cert_path.display().to_string(),
                key_path.display().to_string(),
            );
            (chain, key, false, origin)
        }
        None => {
            let (chain, key) = self_signed_cert()?;
            let generated = "the generated self-signed certificate".to_string();
            (chain, key, true, (generated.clone(), generated))
        }
    };
    let provider = Arc::new(provider_for(choice, true));
    let certified = certified_key(chain, key, &provider, origin)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.ignore_client_order = true;
    config.send_tls13_tickets = 1;
    // RFC 9149: a client that asks for fewer (e.g. none: it will not
    // resume) gets what it asked for.
    config.max_tls13_tickets = 1;
    Ok(ServerTls {
        config: Arc::new(config),
        self_signed,
    })
}

/// The chain and its key as rustls serves them. rustls' own constructor
/// parses the certificate with webpki to compare keys, which refuses X.509
/// v1; here the public key is taken out of the certificate directly and
/// compared byte for byte with the one derived from the private key.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
    (cert_origin, key_origin): (String, String),
) -> Result<CertifiedKey, TlsError> {
    let signing_key = provider.key_provider.load_private_key(key)?;
    let cert_spki = chain
        .first()
        .and_then(|c| certificate_spki(c.as_ref()))
        .ok_or_else(|| TlsError::Certificate(cert_origin.clone()))?;
    // A provider that cannot derive the public key leaves the check to the
    // first handshake (as rustls does).
    if let Some(key_spki) = signing_key.public_key() {
        if key_spki.as_ref() != cert_spki {
            return Err(TlsError::KeyMismatch {
                cert: cert_origin,
                key: key_origin,
            });
        }
    }
    Ok(CertifiedKey::new(chain, signing_key))
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
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "smtpstorm self-signed (localhost)",
    );
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
/// connection built from the returned config. `choice` is what the client
/// offers, in its order (empty: rustls' default offer).
pub fn client_config(
    verify: &ClientVerify,
    resumption_sessions: usize,
    choice: &TlsChoice,
) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let provider = Arc::new(provider_for(choice, false));
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
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verify { inner }))
                .with_no_client_auth()
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

/// The X.509 version (1, 2 or 3) and the SubjectPublicKeyInfo (DER, outer
/// SEQUENCE included) of a DER certificate, read field by field without
/// interpreting anything else (names, dates, extensions may be anything).
fn certificate_fields(cert: &[u8]) -> Option<(u32, &[u8])> {
    der::tbs_fields(cert).map(|f| (f.version, f.spki))
}

/// The SubjectPublicKeyInfo (DER, outer SEQUENCE included) of a DER X.509
/// certificate of any version; `None` if it does not have the shape of one.
pub fn certificate_spki(cert: &[u8]) -> Option<&[u8]> {
    certificate_fields(cert).map(|(_, spki)| spki)
}

/// `(algorithm identifier contents, public key bits)` of a
/// SubjectPublicKeyInfo, as signature algorithms compare and use them.
fn spki_parts(spki: &[u8]) -> Option<(&[u8], &[u8])> {
    let (seq, _) = der::tlv(spki).filter(|(s, _)| s.is(der::SEQUENCE))?;
    let (alg, rest) = der::tlv(seq.data).filter(|(a, _)| a.is(der::SEQUENCE))?;
    let (bits, _) = der::tlv(rest).filter(|(b, _)| b.is(der::BIT_STRING))?;
    match bits.data {
        // No unused bits: keys are whole bytes.
        [0, key @ ..] => Some((alg.data, key)),
        _ => None,
    }
}

fn spki_of<'a>(cert: &'a CertificateDer<'_>) -> Result<&'a [u8], rustls::Error> {
    certificate_spki(cert.as_ref()).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))
}

/// A certificate verifier that accepts **any** server certificate.
///
/// Meant for load-testing targets with self-signed, expired or X.509 v1
/// certificates: it gives no protection against an active attacker.
/// Handshake signatures are still checked against the public key of the
/// certificate presented (so the peer must hold its key); only the chain of
/// trust, the name, the dates and the certificate's form are skipped.
#[derive(Debug)]
pub struct NoVerify {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Only what the signature check will need: a public key.
        spki_of(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 does not tie a scheme to one algorithm (ECDSA names no
        // curve): try each candidate whose key type matches, as rustls does.
        let candidates = self
            .provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algs)| *algs)
            .ok_or(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
        let (key_alg, key) = spki_parts(spki_of(cert)?).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        let mut mismatch = None;
        for alg in candidates {
            if alg.public_key_alg_id().as_ref() != key_alg {
                mismatch = Some(
                    CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                        signature_algorithm_id: alg.signature_alg_id().as_ref().to_vec(),
                        public_key_algorithm_id: key_alg.to_vec(),
                    },
                );
                continue;
            }
            return alg
                .verify_signature(key, message, dss.signature())
                .map(|()| HandshakeSignatureValid::assertion())
                .map_err(|_| CertificateError::BadSignature.into());
        }
        Err(mismatch.unwrap_or(CertificateError::BadSignature).into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki_of(cert)?),
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

/// The verifying verifier (`--tls-verify`): webpki's, plus a clear word for
/// a certificate older than X.509 v3, which webpki refuses as "unsupported
/// certificate version" (the error carries a [`TlsError::UnverifiableVersion`]
/// that the backends print as is).
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some((version @ 1..=2, _)) = certificate_fields(end_entity.as_ref()) {
            return Err(CertificateError::Other(OtherError(Arc::new(
                TlsError::UnverifiableVersion(version),
            )))
            .into());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The message of an error our own verifier made (see [`Verify`]), which
/// rustls would print in its debug form; `None` for any other error.
pub fn own_error_message(e: &rustls::Error) -> Option<String> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<TlsError>()
            .map(|ours| format!("invalid peer certificate: {ours}")),
        _ => None,
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
    /// Its expiry, e.g. `Mar  5 00:00:00 2031 +00:00` (always UTC).
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

    /// Fills the peer-certificate fields from a DER certificate; a field
    /// that does not parse (all of them, if it is not a certificate) is left
    /// empty.
    pub fn set_peer_cert(&mut self, cert: &[u8]) {
        let Some(f) = der::tbs_fields(cert) else {
            return;
        };
        self.peer_subject = der::name_text(&f.subject);
        self.peer_issuer = der::name_text(&f.issuer);
        self.peer_not_after_unix = der::not_after_unix(&f.validity);
        self.peer_not_after = self.peer_not_after_unix.map(der::time_text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEM text of one DER item (rcgen's `pem` feature is off: it links a
    /// second base64).
    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut s = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(line).unwrap());
            s.push('\n');
        }
        s + &format!("-----END {label}-----\n")
    }

    /// A self-signed certificate for localhost and its key, as PEM.
    fn pem_pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (
            pem("CERTIFICATE", c.cert.der()),
            pem("PRIVATE KEY", &c.signing_key.serialize_der()),
        )
    }

    #[test]
    fn self_signed_server_config_says_so() {
        let tls = server_config(None, &TlsChoice::default()).unwrap();
        assert!(tls.self_signed);
    }

    #[test]
    fn pem_files_round_trip_into_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let tls = server_config(Some((&cert_path, &key_path)), &TlsChoice::default()).unwrap();
        assert!(!tls.self_signed);
        // The same PEM works as a CA file for the verifying client.
        client_config(
            &ClientVerify::CaFile(cert_path.clone()),
            0,
            &TlsChoice::default(),
        )
        .unwrap();
    }

    #[test]
    fn missing_or_empty_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");
        let err = server_config(Some((&missing, &missing)), &TlsChoice::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("certificate chain") && err.contains("missing.pem"),
            "{err}"
        );
        let err = server_config(Some((&empty, &empty)), &TlsChoice::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");
    }

    #[test]
    fn peer_certificate_fields_are_parsed() {
        let (chain, _) = self_signed_cert().unwrap();
        let mut info = TlsInfo::default();
        info.set_peer_cert(chain[0].as_ref());
        let subject = "CN=smtpstorm self-signed (localhost)";
        assert_eq!(info.peer_subject.as_deref(), Some(subject), "{info:?}");
        assert_eq!(info.peer_issuer.as_deref(), Some(subject), "{info:?}");
        // rcgen's default validity ends on 4096-01-01 (a GeneralizedTime).
        assert_eq!(info.peer_not_after_unix, Some(67_090_118_400));
        assert_eq!(
            info.peer_not_after.as_deref(),
            Some("Jan  1 00:00:00 4096 +00:00")
        );
        let mut garbage = TlsInfo::default();
        garbage.set_peer_cert(b"not a certificate");
        assert_eq!(garbage, TlsInfo::default());
    }

    /// A certificate with the given subject and expiry, signed by its own key.
    fn cert_with(dn: rcgen::DistinguishedName, not_after: (i32, u8, u8)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = dn;
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn names_print_every_attribute_in_order_and_expiry_in_utc() {
        use rcgen::{DnType, DnValue};
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString("DE".try_into().unwrap()),
        );
        dn.push(DnType::OrganizationName, "Zürich Mail GmbH");
        dn.push(
            DnType::OrganizationalUnitName,
            DnValue::BmpString("Ops €".try_into().unwrap()),
        );
        // organizationIdentifier (not in the table: dotted), and an email.
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 97]), "VATDE-123");
        dn.push(
            DnType::CustomDnType(vec![1, 2, 840, 113_549, 1, 9, 1]),
            DnValue::Ia5String("pm@example.test".try_into().unwrap()),
        );
        dn.push(DnType::CommonName, "mx.example.test");
        let expected = "C=DE, O=Zürich Mail GmbH, OU=Ops €, 2.5.4.97=VATDE-123, \
                        Email=pm@example.test, CN=mx.example.test";
        // UTCTime up to 2049, GeneralizedTime from 2050 on.
        for (date, unix, text) in [
            ((2031, 3, 5), 1_930_435_200, "Mar  5 00:00:00 2031 +00:00"),
            ((2051, 12, 9), 2_585_692_800, "Dec  9 00:00:00 2051 +00:00"),
        ] {
            let der = cert_with(dn.clone(), date);
            let mut info = TlsInfo::default();
            info.set_peer_cert(&der);
            assert_eq!(info.peer_subject.as_deref(), Some(expected));
            assert_eq!(info.peer_issuer.as_deref(), Some(expected));
            assert_eq!(info.peer_not_after_unix, Some(unix));
            assert_eq!(info.peer_not_after.as_deref(), Some(text));
        }
        // An empty name is an empty string, not a missing one.
        let der = cert_with(rcgen::DistinguishedName::new(), (2031, 3, 5));
        let mut info = TlsInfo::default();
        info.set_peer_cert(&der);
        assert_eq!(info.peer_subject.as_deref(), Some(""));
    }

    #[test]
    fn the_public_key_is_read_without_parsing_the_whole_certificate() {
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().as_ref();
        let (version, spki) = certificate_fields(der).unwrap();
        assert_eq!(version, 3);
        assert_eq!(spki, key.subject_public_key_info());
        let (alg, raw) = spki_parts(spki).unwrap();
        assert_eq!(raw, key.der_bytes());
        // The id-ecPublicKey OID (rcgen's default key is ECDSA P-256).
        assert!(alg.starts_with(&[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]));
        for bad in [&b""[..], b"not a certificate", &der[..der.len() / 2]] {
            assert_eq!(certificate_spki(bad), None);
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a_cert, _) = pem_pair();
        let (_, b_key) = pem_pair();
        let cert_path = dir.path().join("a.pem");
        let key_path = dir.path().join("b.key");
        std::fs::write(&cert_path, a_cert).unwrap();
        std::fs::write(&key_path, b_key).unwrap();
        let err = server_config(Some((&cert_path, &key_path)), &TlsChoice::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.key does not belong to the certificate in") && err.contains("a.pem"),
            "{err}"
        );
    }

    #[test]
    fn server_names_accept_hosts_and_ips() {
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("bad name!").is_err());
    }

    #[test]
    fn suite_and_group_lists_take_rustls_and_openssl_names_and_refuse_others_with_the_valid_ones() {
        let suites = parse_suites("TLS_AES_128_GCM_SHA256, tls13_aes_256_gcm_sha384").unwrap();
        let names: Vec<String> = suites.iter().map(|s| suite_name(*s)).collect();
        assert_eq!(
            names,
            ["TLS13_AES_128_GCM_SHA256", "TLS13_AES_256_GCM_SHA384"]
        );
        let groups = parse_groups("x25519,P-256,secp384r1,X25519MLKEM768").unwrap();
        let names: Vec<String> = groups.iter().map(|g| group_name(*g)).collect();
        assert_eq!(
            names,
            ["X25519", "secp256r1", "secp384r1", "X25519MLKEM768"]
        );
        let e = parse_suites("TLS13_AES_128_GCM_SHA256,RC4").unwrap_err();
        assert!(
            e.starts_with("unknown TLS cipher suite `RC4`; valid: "),
            "{e}"
        );
        assert!(
            e.contains("TLS13_CHACHA20_POLY1305_SHA256") && !e.contains('\n'),
            "{e}"
        );
        let e = parse_groups("x448").unwrap_err();
        assert!(
            e.contains("`x448`") && e.contains("X25519, secp256r1"),
            "{e}"
        );
        assert!(parse_suites(" , ").is_err());
    }

    #[test]
    fn the_server_prefers_a_sha256_suite_and_aes_128_when_the_cpu_has_aes() {
        let order: Vec<String> = server_suite_order()
            .iter()
            .map(|s| suite_name(*s))
            .collect();
        assert!(
            order[0].starts_with("TLS13_") && order[0].ends_with("SHA256"),
            "{order:?}"
        );
        let sha384 = order
            .iter()
            .position(|n| n == "TLS13_AES_256_GCM_SHA384")
            .unwrap();
        assert!(sha384 > 1, "{order:?}");
        if aes_in_hardware() {
            assert_eq!(order[0], "TLS13_AES_128_GCM_SHA256");
        }
        // Every default suite is still there.
        assert_eq!(order.len(), provider().cipher_suites.len());
    }

    #[test]
    fn the_precomputed_pad_hkdf_gives_the_same_keys_as_aws_lc_hkdf() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        for (ours, theirs) in [
            (
                with_pad_hkdf(cs::TLS13_AES_128_GCM_SHA256),
                cs::TLS13_AES_128_GCM_SHA256,
            ),
            (
                with_pad_hkdf(cs::TLS13_AES_256_GCM_SHA384),
                cs::TLS13_AES_256_GCM_SHA384,
            ),
        ] {
            let (a, b) = (
                ours.tls13().unwrap().hkdf_provider,
                theirs.tls13().unwrap().hkdf_provider,
            );
            assert!(!std::ptr::addr_eq(a, b), "the suite was replaced");
            let secret = [7u8; 48];
            let (ea, eb) = (
                a.extract_from_secret(Some(b"salt"), &secret),
                b.extract_from_secret(Some(b"salt"), &secret),
            );
            let info: &[&[u8]] = &[b"\x00\x20", b"\x0dtls13 c hs traffic", b"\x20", &[9; 32]];
            assert_eq!(
                ea.expand_block(info).as_ref(),
                eb.expand_block(info).as_ref()
            );
            let (mut oa, mut ob) = ([0u8; 12], [0u8; 12]);
            ea.expand_slice(info, &mut oa).unwrap();
            eb.expand_slice(info, &mut ob).unwrap();
            assert_eq!(oa, ob);
            let (za, zb) = (a.extract_from_zero_ikm(None), b.extract_from_zero_ikm(None));
            assert_eq!(
                za.expand_block(info).as_ref(),
                zb.expand_block(info).as_ref()
            );
            let okm = eb.expand_block(info);
            assert_eq!(
                a.hmac_sign(&okm, b"transcript").as_ref(),
                b.hmac_sign(&okm, b"transcript").as_ref()
            );
        }
    }

    #[test]
    fn installing_the_provider_twice_is_harmless() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
