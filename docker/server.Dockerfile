# trainctl control server: slim, no torch. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t trainctl-server .
# The server stores and dispatches runs and streams metrics; it never trains, so it gets
# the core dependencies only (grpcio, SQLAlchemy, Alembic, pydantic...) plus the
# PostgreSQL driver for the compose `postgres` profile and s3fs for an s3:// artifact store.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/trainctl/src
COPY pyproject.toml README.md ./
COPY trainctl ./trainctl
COPY server ./server
COPY workers ./workers
COPY client ./client

# Core dependencies plus the PostgreSQL driver and the Prometheus client; no [worker]
# extra, so no torch, torchvision, timm, numpy or scikit-learn. The checks fail the build
# if that changes.
RUN pip install ".[postgres,metrics,s3]" \
 && python -c "import importlib.util as u, sys; heavy = [m for m in ('torch', 'torchvision', 'timm') if u.find_spec(m)]; sys.exit('server image must not contain %s' % heavy if heavy else 0)" \
 && python -c "import trainctl.server.app, trainctl.client.cli, psycopg, prometheus_client, s3fs" \
 && trainctl server --help >/dev/null \
 && cd / && rm -rf /opt/trainctl/src

RUN useradd --system --uid 10001 --home-dir /var/lib/trainctl --shell /usr/sbin/nologin trainctl \
 && mkdir -p /var/lib/trainctl/db /var/lib/trainctl/artifacts \
 && chown -R trainctl /var/lib/trainctl
USER trainctl
WORKDIR /var/lib/trainctl
# The artifact store's default home (TRAINCTL_ARTIFACTS or --artifacts DIR|URL to change it).
ENV TRAINCTL_ARTIFACTS=/var/lib/trainctl/artifacts
VOLUME ["/var/lib/trainctl/db", "/var/lib/trainctl/artifacts"]
EXPOSE 50051

CMD ["trainctl", "server", "--listen", "0.0.0.0:50051", "--db", "sqlite:////var/lib/trainctl/db/trainctl.db"]
