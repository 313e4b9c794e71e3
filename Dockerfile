# The gateway with its defaults: recording and transcription on port 8080.
# It mirrors the README's install (`pip install .`); keep the two in step.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_MODEL_CACHE=/data/.models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY pipelines ./pipelines
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app gateway \
    && mkdir -p /data \
    && chown gateway /data

USER gateway
VOLUME ["/data"]
EXPOSE 8080

# SIGTERM drains: bot sockets close with 1001, every session is finalized and its
# recording flushed before the process exits. Give it time to finish a long meeting's files.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"

CMD ["meeting-gateway", "serve"]
