# The MailGenius services and workers (one image; docker-compose.yml and deploy/kubernetes pick
# the command). Dependencies come from the lock (requirements/runtime.txt, hashes checked).
#   docker build -t mailgenius-monitor:$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2) .
#   docker run --rm mailgenius-monitor --version

# -- build: a virtualenv with the locked dependencies and the project --------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# dependencies first (cached while only the code changes)
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/venv/bin/pip install --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md LICENSE ./
COPY mailgenius ./mailgenius
COPY sender ./sender
COPY importer ./importer
COPY exporter ./exporter
COPY alerting ./alerting
COPY dashboards ./dashboards
COPY deploy ./deploy
COPY console ./console
RUN /opt/venv/bin/pip install --no-deps --no-compile . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# -- runtime: no compilers, no pip cache, a non-root user ---------------------------------------
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MAILGENIUS_DATA_DIR=/var/lib/mailgenius \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp
# postgresql-client: pg_dump / pg_restore for `mailgenius backup`
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/mailgenius mailgenius \
 && mkdir -p /var/lib/mailgenius/uploads /var/lib/mailgenius/sink \
 && chown -R 10001:10001 /var/lib/mailgenius
COPY --from=build /opt/venv /opt/venv
COPY LICENSE /usr/share/doc/mailgenius-monitor/LICENSE

USER 10001:10001
WORKDIR /var/lib/mailgenius
EXPOSE 8001 8002 9300 9191 9192 1025
ENTRYPOINT ["mailgenius"]
CMD ["--help"]
