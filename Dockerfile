# The image scripts/k8s/ names (smtpstorm:latest). From the repository root:
#   docker build -t smtpstorm:latest .
# (`podman build -t smtpstorm:latest .` alike). Two stages: the release build
# with the Rust toolchain the crate asks for (rust-version in Cargo.toml),
# then the binary alone on Debian slim, with /bin/sh for the Job scripts and
# the CA bundle for --tls-verify.
FROM docker.io/library/rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin smtpstorm

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/smtpstorm /usr/local/bin/smtpstorm
ENTRYPOINT ["/usr/local/bin/smtpstorm"]
CMD ["--help"]
