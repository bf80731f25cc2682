# syntax=docker/dockerfile:1
# recsvc API image: gunicorn serving a registry mounted at /registry.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # implicit parallelises itself; threaded BLAS underneath it is much slower.
    OPENBLAS_NUM_THREADS=1

# implicit's compiled extensions link the system OpenMP runtime (libgomp), which slim images lack.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 recsvc \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin recsvc

WORKDIR /app

# Dependency layer: rebuilt only when pyproject.toml changes, not on every code change.
COPY pyproject.toml README.md ./
RUN mkdir -p recsvc training \
    && touch recsvc/__init__.py training/__init__.py \
    && pip install . \
    && pip uninstall -y recsvc

COPY recsvc ./recsvc
COPY training ./training
RUN pip install --no-deps . \
    && mkdir -p /registry /var/lib/recsvc/spool \
    && chown 10001:10001 /registry /var/lib/recsvc /var/lib/recsvc/spool

USER 10001:10001
# The spool keeps accepted feedback and events while Redis is down: it must be writable by this user.
# gunicorn runs without `recsvc serve` here, so the malloc settings it would give (recsvc/cli.py) are set here.
ENV RECSVC_REGISTRY=/registry \
    RECSVC_SPOOL_DIR=/var/lib/recsvc/spool \
    RECSVC_BIND=0.0.0.0:8000 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    MALLOC_TRIM_THRESHOLD_=1048576
EXPOSE 8000
VOLUME ["/registry"]

# The port of RECSVC_BIND, so a container started with another one stays healthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('RECSVC_BIND', ':8000').rpartition(':')[2]; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)"]

CMD ["gunicorn", "-c", "python:recsvc.gunicorn_conf", "recsvc.wsgi:app"]
