# One image for every Ballast service; the command picks the service:
#   docker run ballast serve limiter
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY gen/ gen/
COPY services/ services/
RUN pip install -c constraints.txt . \
 && useradd --system --uid 10001 ballast \
 && mkdir /certs && chown ballast /certs
COPY config/ config/
USER ballast
# Containers listen on every interface; BALLAST_HOST defaults to loopback elsewhere. An internal
# service on 0.0.0.0 refuses to start without mutual TLS (BALLAST_TLS_CERT_FILE, _KEY_FILE,
# _CA_FILE; `ballast certs /certs` makes them into the /certs volume) unless
# BALLAST_INSECURE_INTERNAL=true says a mesh provides it. The demo keys in config/ load only when
# BALLAST_EDGE_KEYS_FILE names them, and an edge on 0.0.0.0 refuses them.
ENV BALLAST_HOST=0.0.0.0 BALLAST_LOG_FORMAT=json
EXPOSE 50051 50052 50053 50054 50055 8080
ENTRYPOINT ["ballast"]
CMD ["up"]
