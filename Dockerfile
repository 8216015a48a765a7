# syntax=docker/dockerfile:1
# pop3d container image: build a wheel in one stage, install it into a clean slim image in the next,
# so compilers and pip caches never reach the runtime image.
#
#   docker build -t pop3d .
#   docker run -d -p 110:110 -v ./passwd:/etc/pop3d/passwd:ro -v mail:/srv/mail pop3d
#
# Low ports without root: Docker (>= 20.10) sets net.ipv4.ip_unprivileged_port_start=0 inside the
# container's network namespace, so the unprivileged user binds 110/995 directly. On engines that do not,
# run with --sysctl net.ipv4.ip_unprivileged_port_start=0, or set POP3D_SERVER__LISTEN='[":1110"]' and map
# -p 110:1110.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pop3d ./pop3d
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim
# a dedicated unprivileged user in group mail (gid 8 in Debian), so Maildirs owned by group mail work
RUN useradd --system --uid 110 --gid mail --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pop3d
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels pop3d && rm -rf /wheels
COPY contrib/docker/pop3d.toml /etc/pop3d/pop3d.toml
# /var/lib/pop3d (server.state_dir): the secret that keeps answers for unknown users the same across
# restarts, and the mbox index directory; a volume, so a new container keeps them
RUN mkdir -p /srv/mail /var/lib/pop3d && chown pop3d:mail /srv/mail /var/lib/pop3d && chmod 0700 /var/lib/pop3d

# logs go to stdout unbuffered; the config file is found without arguments; POP3D_<SECTION>__<KEY> overrides it
ENV PYTHONUNBUFFERED=1 \
    POP3D_CONFIG_FILE=/etc/pop3d/pop3d.toml

VOLUME ["/srv/mail", "/var/lib/pop3d"]
EXPOSE 110 995
USER pop3d

# a real POP3 greeting check: exits non-zero unless the server answers +OK within the timeout
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 \
    CMD ["pop3d", "health", "127.0.0.1:110", "--timeout", "5"]

# SIGTERM (docker stop) drains: no new connections, sessions get server.shutdown_grace seconds (default 10;
# give docker stop a longer --time), then the rest are cut and delete nothing.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pop3d"]
CMD ["serve"]
