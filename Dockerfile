# The MailGenius services and workers (one image; docker-compose.yml picks the command).
#   docker build -t mailgenius-monitor .
#   docker run --rm mailgenius-monitor --help
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAILGENIUS_DATA_DIR=/var/lib/mailgenius \
    MPLBACKEND=Agg

# postgresql-client: pg_dump / pg_restore for `mailgenius backup`
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# dependencies first (cached while only the code changes)
COPY pyproject.toml README.md ./
RUN mkdir -p mailgenius sender importer exporter alerting dashboards \
 && touch mailgenius/__init__.py sender/__init__.py importer/__init__.py exporter/__init__.py \
          alerting/__init__.py dashboards/__init__.py \
 && pip install . \
 && pip uninstall -y mailgenius-monitor
COPY mailgenius ./mailgenius
COPY sender ./sender
COPY importer ./importer
COPY exporter ./exporter
COPY alerting ./alerting
COPY dashboards ./dashboards
COPY console ./console
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/mailgenius mailgenius \
 && mkdir -p /var/lib/mailgenius/uploads /var/lib/mailgenius/sink \
 && chown -R mailgenius /var/lib/mailgenius

USER mailgenius
WORKDIR /var/lib/mailgenius
EXPOSE 8001 8002 9300 9191 9192 1025
ENTRYPOINT ["mailgenius"]
CMD ["--help"]
