# Test-only stand-in for the official `postgres` image, which cannot be pulled where no image registry is reachable:
# Debian bookworm's PostgreSQL 15 with an entrypoint honouring the same environment (postgres-entrypoint.sh).
# Built and cached by scripts/docker-test.sh, never shipped.
ARG DEBIAN_IMAGE=allconv-test/debian:bookworm
FROM ${DEBIAN_IMAGE}

RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && pg_dropcluster 15 main \
    && mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql /var/lib/postgresql/data \
    && chown postgres:postgres /var/run/postgresql /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:${PATH} \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
# PostgreSQL's "fast shutdown", as in the official image.
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
