//! Micro-benchmarks of the SMTP wire layer: command-line parsing and the
//! DATA end-of-body scan (bytes/s on realistic 78-byte-line bodies).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smtpstorm::smtp::data::DataScanner;
use smtpstorm::smtp::wire::parse_command;
use smtpstorm::smtp::BareLfPolicy;

/// A dot-stuffed body of `size` bytes (roughly) made of 76 printable bytes
/// and CRLF per line, one line in 50 starting with a stuffed dot, ended by
/// `CRLF.CRLF`.
fn body(size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size + 100);
    let mut i = 0u32;
    while b.len() < size {
        if i % 50 == 7 {
            b.extend_from_slice(b"..");
        }
        for j in 0..76u32 {
            b.push(b'!' + ((i * 7 + j * 13) % 90) as u8);
        }
        b.extend_from_slice(b"\r\n");
        i += 1;
    }
    b.extend_from_slice(b".\r\n");
    b
}

fn bench_commands(c: &mut Criterion) {
    let lines: [&[u8]; 5] = [
        b"EHLO client.example.com",
        b"MAIL FROM:<sender@example.com> SIZE=12345 BODY=8BITMIME",
        b"RCPT TO:<recipient@example.net> NOTIFY=SUCCESS,FAILURE",
        b"DATA",
        b"BDAT 65536 LAST",
    ];
    let mut g = c.benchmark_group("parse_command");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("five_commands", |b| {
        b.iter(|| {
            for l in &lines {
                let _ = black_box(parse_command(black_box(l)));
            }
        })
    });
    g.finish();
}

fn bench_data(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_scan");
    for (name, size) in [("1KiB", 1024usize), ("64KiB", 64 * 1024), ("1MiB", 1024 * 1024)] {
        let input = body(size);
        g.throughput(Throughput::Bytes(input.len() as u64));
        for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize] {
            let id = BenchmarkId::new(format!("{policy:?}"), name);
            g.bench_with_input(id, &input, |b, input| {
                let mut sc = DataScanner::new(policy);
                b.iter(|| {
                    sc.reset(policy);
                    let mut n = 0usize;
                    let r = sc.scan(black_box(input), |s| n += s.len());
                    assert!(r.ended);
                    black_box(n)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_commands, bench_data);
criterion_main!(benches);
