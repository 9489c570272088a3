//! The public-key floor of a TLS 1.3 handshake: the operations a full and a
//! resumed STARTTLS session must do, timed alone with the library rustls
//! uses (aws-lc-rs), in CPU time of this thread. `scripts/compare.sh` puts
//! these figures beside its STARTTLS rows (results/tls.md says how).
//!
//! Per side and handshake (TLS 1.3, X25519, an ECDSA P-256 certificate, the
//! sink's default):
//! - sink, full: one X25519 key generation and one agreement, one P-256
//!   signature; resumed: the X25519 part only (psk_dhe_ke);
//! - blaster, full: the same X25519 part and one P-256 verification;
//!   resumed: the X25519 part only.
//!
//! Also the transcript hash per KiB with SHA-256 and SHA-384, the hash a
//! suite forces on the handshake.
//!
//! Usage: `cargo run --profile ci --example tls_floor [-- ITERATIONS]`;
//! prints one JSON object (microseconds per operation).

use aws_lc_rs::{agreement, digest, rand, signature};
use signature::KeyPair;

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// Microseconds of CPU per call of `f`, the best of 5 batches of `n`.
fn per_op(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n.min(50) {
        f();
    }
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = thread_cpu_us();
        for _ in 0..n {
            f();
        }
        best = best.min((thread_cpu_us() - t0) / f64::from(n));
    }
    best
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let rng = rand::SystemRandom::new();

    let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
    let peer_pub = peer.compute_public_key().unwrap();
    let peer_pub = peer_pub.as_ref().to_vec();
    let x25519 = per_op(n, || {
        let k = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
        let public = k.compute_public_key().unwrap();
        std::hint::black_box(public.as_ref());
        agreement::agree_ephemeral(
            k,
            agreement::UnparsedPublicKey::new(&agreement::X25519, &peer_pub),
            (),
            |secret| {
                std::hint::black_box(secret);
                Ok(())
            },
        )
        .unwrap();
    });

    let pkcs8 =
        signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
    )
    .unwrap();
    // What TLS 1.3 signs: 64 spaces, a context string, 0, the transcript hash.
    let mut msg = vec![0x20u8; 64];
    msg.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    msg.extend_from_slice(&[0xab; 32]);
    let sig = key.sign(&rng, &msg).unwrap();
    let sign = per_op(n, || {
        std::hint::black_box(key.sign(&rng, &msg).unwrap());
    });
    let public = key.public_key().as_ref().to_vec();
    let verify = per_op(n, || {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
            .verify(&msg, sig.as_ref())
            .unwrap();
    });

    let kib = vec![0x5au8; 1024];
    let sha256 = per_op(n * 10, || {
        std::hint::black_box(digest::digest(&digest::SHA256, &kib));
    });
    let sha384 = per_op(n * 10, || {
        std::hint::black_box(digest::digest(&digest::SHA384, &kib));
    });

    println!(
        "{}",
        serde_json::json!({
            "library": "aws-lc-rs (rustls' provider)",
            "iterations": n,
            "x25519_keygen_and_agree_us": x25519,
            "p256_sign_us": sign,
            "p256_verify_us": verify,
            "sha256_per_kib_us": sha256,
            "sha384_per_kib_us": sha384,
            "sink_full_us": x25519 + sign,
            "sink_resumed_us": x25519,
            "blast_full_us": x25519 + verify,
            "blast_resumed_us": x25519,
        })
    );
}
