# A small image that runs the relay: `docker build -t trio-llm-relay .`
# then `docker run -p 8000:8000 -e RELAY_API_KEYS=... -e RELAY_STEP_TOKENS=... trio-llm-relay`
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY relay ./relay
COPY protocol ./protocol
COPY providers ./providers
COPY bench ./bench
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER relay
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ping', timeout=2)"
ENTRYPOINT ["relay", "serve", "--host", "0.0.0.0", "--port", "8000"]
