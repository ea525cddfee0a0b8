# edgerun's fleet server for KServe (or any container host), CPU only:
#   docker build -t edgerun:0.1.0 .
#   docker run -p 8080:8080 -p 8081:8081 -v $PWD/models/digits/1:/mnt/models:ro edgerun:0.1.0
# OIP v2 + TF Serving REST + /metrics on 8080, OIP v2 gRPC on 8081. Without arguments it serves
# the one model in /mnt/models (where KServe's storage initializer puts it); KServe's
# ClusterServingRuntime (deploy/kserve/) passes the same flags plus --model-name. The [tflite]
# extra (LiteRT) is installed because the runtime declares the tflite model format. tini is PID
# 1 (Kubernetes runs no init): it reaps orphans and passes SIGTERM on to edgerun.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgerun edgerun
COPY runtime runtime
COPY adapters adapters
COPY devices devices
COPY optimizers optimizers
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server,tflite]"

FROM python:3.11-slim
# user 1000 has no home: caches (TensorRT engines) go where any user may write
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 EDGERUN_CACHE=/tmp/edgerun
COPY --from=build /wheels /wheels
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir --no-index --find-links /wheels "edgerun[server,tflite]" \
    && rm -rf /wheels \
    && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin edgerun
USER 1000
EXPOSE 8080 8081
ENTRYPOINT ["tini", "--", "edgerun", "serve"]
CMD ["--model-dir", "/mnt/models", "--host", "0.0.0.0", "--port", "8080", "--grpc-port", "8081"]
