# The offline stand-in for python:3.11-slim, built by deploy/compose-offline.sh: Debian bookworm (debootstrap
# from the Debian mirror, then `docker import`) with bookworm's Python 3.11 in a venv on PATH, so `python` and
# `pip` mean what they mean in the official image. It also carries what this machine's pip needs and cannot
# get from inside a container: the host's CA bundle and index settings (pip.conf, written by the script), and
# the CPU torch wheel, installed here because PyTorch's index cannot be reached.
ARG DEBIAN_IMAGE=draftwire-offline/debian:bookworm
FROM ${DEBIAN_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY host-ca.crt /usr/local/share/ca-certificates/host-ca.crt
RUN update-ca-certificates
COPY pip.conf /etc/pip.conf
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

# torch in a stage of its own: the wheel's copy stays out of the final image's layers.
FROM base AS torch
LABEL draftwire.offline.stage=torch
COPY torch-*.whl /tmp/wheels/
RUN python3 -m venv /opt/venv && pip install --no-cache-dir /tmp/wheels/torch-*.whl

FROM base
COPY --from=torch /opt/venv /opt/venv
CMD ["python"]
