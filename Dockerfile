# One image for every process of the system; compose.yaml picks the command per container.
FROM python:3.11-slim

# PYTHONPATH: the source tree in /app wins over the installed copy, because migrations read
# db/sql/ relative to the repo root. BIND_HOST: listen on every interface, not on loopback.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    BIND_HOST=0.0.0.0

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# dramatiq-dashboard's pins forbid dramatiq 2, which it works with; its jinja2 and redis
# come with the project's own dependencies.
COPY pyproject.toml ./
RUN mkdir -p services actors \
    && touch services/__init__.py actors/__init__.py \
    && pip install . \
    && pip install --no-deps dramatiq-dashboard==0.4.0 \
    && rm -rf build *.egg-info

COPY . .
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && useradd --create-home --uid 10001 --user-group app

USER app

EXPOSE 8080 8081 8082 8090

CMD ["uvicorn", "--factory", "services.gateway.app:create_app", "--host", "0.0.0.0", "--port", "8080", "--http", "services.common.http:CoalescingHttpToolsProtocol"]
