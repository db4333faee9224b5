# tornado-proxy image:  docker build -t tornado-proxy:0.1.0 .
#   docker run -p 4000:4000 -e LITELLM_MASTER_KEY=sk-... tornado-proxy:0.1.0
#   docker run ... -v $PWD/config.yaml:/app/routes.yaml:ro tornado-proxy:0.1.0   # your own config
# pycurl and psycopg2-binary install from wheels (Linux x86_64/aarch64), so no compiler is needed;
# the build stage keeps pip and its caches out of the final image.

FROM python:3.12-slim AS build
WORKDIR /src
# setup.py reads README.md (long description) and installs schemas/ and sql/ as data files.
COPY setup.py README.md ./
COPY tornado_proxy ./tornado_proxy
COPY schemas ./schemas
COPY sql ./sql
RUN python -m venv /opt/tornado-proxy \
    && /opt/tornado-proxy/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/tornado-proxy/bin/pip install --no-cache-dir .

FROM python:3.12-slim
# A fixed, unprivileged uid/gid (the Kubernetes manifests' runAsUser/runAsGroup).
RUN groupadd --system --gid 10001 tornado-proxy \
    && useradd --system --uid 10001 --gid tornado-proxy --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin tornado-proxy
COPY --from=build /opt/tornado-proxy /opt/tornado-proxy
ENV PATH=/opt/tornado-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY routes.yaml /app/routes.yaml
# The gateway writes under var/ of its working directory (pid/state files, health-check results,
# spend spill files): the only directory the user may write (a volume when the root is read-only).
RUN mkdir /app/var && chown tornado-proxy:tornado-proxy /app/var
USER 10001:10001
EXPOSE 4000
# The port of CMD below: change both together.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:4000/health/liveliness', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["proxyctl", "serve"]
CMD ["--config", "/app/routes.yaml", "--port", "4000"]
