# secret-sidecar image: a venv built from the hash-pinned lock, on a slim Python runtime.
#
# The dependencies come from a wheelhouse in the build context, never from an index:
# `make wheelhouse` fills build/wheels/ (`pip download` of requirements/runtime.txt for
# linux x86_64 CPython 3.11, and the project's own wheel), and `make image` builds.
#
# Runs as sidecar, uid:gid 10001:10001. The socket directory /var/run/secret-sidecar is
# a volume owned by 10001 with the setgid bit, so the socket (mode 0660, listen.mode)
# gets the directory's group: a gateway joins that group (10001 here, or the pod's
# fsGroup on a Kubernetes volume) to connect. Nothing else is written at run time, so
# the container runs with a read-only root filesystem.

FROM python:3.11-slim AS build

ARG VERSION=0.1.0
COPY requirements/runtime.txt /tmp/runtime.txt
COPY build/wheels/ /tmp/wheels/
# python3 from PATH: /usr/local/bin in python:3.11-slim, /usr/bin on a Debian base.
# The project's own wheel is built from this tree, so it has no hash in the lock.
# pip and setuptools leave the venv once it is filled: nothing installs at run time.
# Bytecode is compiled here with hashes that are not checked, so the copies in the
# final stage are used as they are whatever their timestamps.
RUN python3 -m venv /opt/secret-sidecar \
    && /opt/secret-sidecar/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        --require-hashes --no-deps -r /tmp/runtime.txt \
    && /opt/secret-sidecar/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        --no-deps "secret-sidecar==${VERSION}" \
    && /opt/secret-sidecar/bin/pip uninstall --yes --quiet pip setuptools \
    && /opt/secret-sidecar/bin/python -m compileall -q -f --invalidation-mode unchecked-hash \
        /opt/secret-sidecar/lib

# The default config: the env backend (built in, no vault entry needed:
# {vault://env/db-password} reads DB_PASSWORD from the container's environment), the
# socket in the volume, metrics on every interface for Prometheus. Mount your own file
# over it (a ConfigMap in Kubernetes) to add vaults, prefetch and clients.
RUN mkdir -p /tmp/etc \
    && printf '%s\n' \
        '# secret-sidecar image default: env backend, socket in the volume, metrics on :9464.' \
        'listen:' \
        '  socket: /var/run/secret-sidecar/sidecar.sock' \
        '  mode: "0660"' \
        'metrics:' \
        '  address: 0.0.0.0:9464' \
        'log:' \
        '  level: info' \
        '  format: json' \
        > /tmp/etc/config.yaml


FROM python:3.11-slim

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="secret-sidecar" \
      org.opencontainers.image.description="Local secrets sidecar for API gateways: resolves Kong vault references over a Unix socket." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/secret-sidecar/secret-sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH="/opt/secret-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=build /opt/secret-sidecar /opt/secret-sidecar
COPY --from=build /tmp/etc/config.yaml /etc/secret-sidecar/config.yaml

# Fixed ids, so volumes, fsGroup and runAsUser can name them. The interpreter's own
# modules are compiled too (python:3.11-slim ships them without bytecode), because a
# read-only root means nothing can be cached at run time: each `health` probe would
# compile them again. `check` fails the build if the baked config does not load.
RUN groupadd --gid 10001 sidecar \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
    && install -d -o 10001 -g 10001 -m 2750 /var/run/secret-sidecar \
    && python3 -m compileall -q -j 0 -x '/(test|tests|idlelib|tkinter|turtledemo|lib2to3)/' \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
    && secret-sidecar check -c /etc/secret-sidecar/config.yaml

USER 10001:10001
VOLUME /var/run/secret-sidecar
EXPOSE 9464

HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["secret-sidecar", "health", "--socket", "/var/run/secret-sidecar/sidecar.sock"]

ENTRYPOINT ["secret-sidecar"]
CMD ["run", "-c", "/etc/secret-sidecar/config.yaml"]
