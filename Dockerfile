# Multi-stage build of the adapter: compile with the Rust toolchain image, run on a slim Debian.
#   docker build -t mqtt-adapter .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin mqtt-adapter

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home mqtt \
 && mkdir -p /var/lib/mqtt-adapter/data \
 && chown -R mqtt /var/lib/mqtt-adapter
COPY --from=build /src/target/release/mqtt-adapter /usr/local/bin/mqtt-adapter
USER mqtt
# SMQ_MQTT_ADAPTER_DATA_DIR (./data: the local state, the event and message logs) must be
# writable by the non-root user; mount a volume on /var/lib/mqtt-adapter/data to keep it.
WORKDIR /var/lib/mqtt-adapter
# MQTT, MQTT over TLS, WebSocket, secure WebSocket, HTTP (/health, /metrics)
EXPOSE 1883 8883 8080 8084 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mqtt-adapter"]
