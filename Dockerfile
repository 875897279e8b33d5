# A small image that runs the relay: `docker build -t trio-llm-relay .` then
#   docker run -p 8000:8000 -e RELAY_API_KEYS=... -e RELAY_STEP_TOKENS=... trio-llm-relay
# Every setting is a RELAY_* variable (`docker run trio-llm-relay --help` lists them):
# the entrypoint passes no flag, since a flag would beat the variable. Arguments after
# the image name are added to `relay serve` (`docker run ... trio-llm-relay --demo`).
#
# The Python minor version is pinned to one CI tests (tests/test_container.py checks
# that it is the interpreter running the tests and one of setup.cfg's classifiers).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY relay ./relay
COPY protocol ./protocol
COPY providers ./providers
COPY bench ./bench
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relay
# defaults for a container; `-e RELAY_PORT=9000` (or any RELAY_*) overrides them
ENV PYTHONUNBUFFERED=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8000
EXPOSE 8000
# GET /ping on 127.0.0.1:$RELAY_PORT (its Unix socket with RELAY_UDS, HTTPS with
# RELAY_CERTFILE), read from the same settings as the relay: exit 0 or 1
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["relay", "healthcheck"]
ENTRYPOINT ["relay", "serve"]
