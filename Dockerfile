# syntax=docker/dockerfile:1
# ficus in a container: a release build on the pinned toolchain, run as a non-root user on
# debian:bookworm-slim.
#
#   docker build -t ficus .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -e FICUS_LEGACY=http://legacy.internal:8080 -e FICUS_NEW=http://new.internal:8080 \
#     -v "$PWD/routing-rules:/etc/ficus/routing-rules:ro" ficus
#
# FICUS_LEGACY and FICUS_NEW have no default: give them at `docker run`. The rules in the image
# are the repository's routing-rules/; mount your own over /etc/ficus/routing-rules as above
# (ficus reloads them when they change). Other commands run the same way, e.g.
#   docker run --rm -v "$PWD/routing-rules:/etc/ficus/routing-rules:ro" ficus rules check /etc/ficus/routing-rules
# The HEALTHCHECK asks the admin listener on port 9901: keep that port if you change
# FICUS_ADMIN_LISTEN.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# rust-toolchain.toml pins the toolchain; rustup fetches what the image lacks of it.
# The cache mounts keep the registry and build artefacts between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/ficus /usr/local/bin/ficus

FROM debian:bookworm-slim
# ca-certificates: https:// upstreams; curl: the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin ficus \
 && install -d -o ficus -g ficus /var/lib/ficus
COPY --from=builder /usr/local/bin/ficus /usr/local/bin/ficus
COPY routing-rules/ /etc/ficus/routing-rules/
ENV FICUS_RULES=/etc/ficus/routing-rules \
    FICUS_LISTEN=0.0.0.0:8080 \
    FICUS_ADMIN_LISTEN=0.0.0.0:9901
EXPOSE 8080 9901
# The default store (sqlite:ficus.db) and spool (ficus-spool/) are relative to the working
# directory, which must be the ficus user's to write: `/` is not, and ficus would not start.
# Mount a volume on /var/lib/ficus to keep records and the spool across containers.
WORKDIR /var/lib/ficus
USER ficus
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["ficus"]
CMD ["serve"]
