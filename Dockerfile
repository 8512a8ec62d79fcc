# kws serve: the HTTP/WebSocket keyword spotter, runtime dependencies only (LiteRT, no TensorFlow).
#   docker build -t kws .
#   docker run -p 8000:8000 -v $PWD/runs/s8/export:/model:ro -e KWS_MODEL=/model kws
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# soundfile's and LiteRT's wheels bundle their native libraries: nothing to apt-get.
# The dependencies get a layer of their own, which only pyproject.toml invalidates: a change to
# kws or README.md does not download and install them again.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md LICENSE /src/
COPY kws /src/kws/
RUN pip install --no-deps /src && rm -rf /src

RUN useradd --create-home --uid 10001 kws
USER kws
WORKDIR /home/kws

# kws serve's port; set KWS_PORT to move it, and the health check follows.
ENV KWS_PORT=8000
EXPOSE 8000
# slim has no curl: probe /health with the image's own Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"KWS_PORT\"]}/health', timeout=4)"]
CMD ["kws", "serve", "--host", "0.0.0.0"]
