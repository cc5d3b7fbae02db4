# tierserve's image for KubeRay (k8s/) and Ray GPU clusters: Ray 2.60 + CUDA 12.8 + Python 3.11,
# the project at /app installed with the `gpu` extra (CUDA vLLM, faiss-gpu), the Feast repo built
# in, the calibration file in. Model weights are NOT in it: k8s/model-cache.yaml fills a volume.
# Build and push (docs/operations.md, "The image"); the tag is the one k8s/kustomization.yaml sets:
#   docker build -t registry.example.com/tierserve:0.1.0 . && docker push registry.example.com/tierserve:0.1.0
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="tierserve" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# KubeRay injects readiness/liveness probes that run `wget` against the Ray dashboard agent and
# the Serve proxy: without it every Ray pod stays unready.
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /app /var/lib/tierserve \
 && chown -R 1000:100 /app /var/lib/tierserve

# Ray's images run as `ray` (uid 1000, gid 100), which owns the Python environment. Numeric, so
# that a pod's `runAsNonRoot: true` can be checked by the kubelet.
USER 1000:100
WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/lib/tierserve/hf

# The pinned dependencies first, in their own layer: vLLM and torch are GBs, and this layer is
# reused for as long as pyproject.toml does not change.
COPY --chown=1000:100 pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements-gpu.txt \
 && pip install -r /tmp/requirements-gpu.txt \
 && rm /tmp/requirements-gpu.txt

# The code, the Serve configs (with configs/semantic_calibration.json), the feature repo's
# definitions and the MovieLens sample it is built from.
COPY --chown=1000:100 caches/ caches/
COPY --chown=1000:100 deployments/ deployments/
COPY --chown=1000:100 feature_store/ feature_store/
COPY --chown=1000:100 benchmarks/ benchmarks/
COPY --chown=1000:100 configs/ configs/
# Everything above is installed already; this registers the project itself (editable, so that
# /app/feature_store is both the package and the Feast repo the pods copy).
RUN pip install -e ".[gpu]"

# The built feature repo (parquet, registry, meta.json) at /app/feature_store/data. With no
# ../shared in the image, the pipeline reads the shipped sample (feature_store/sample/SAMPLE.md).
RUN python -m feature_store.pipeline --quiet \
 && test -f /app/feature_store/data/meta.json \
 && test -f /app/configs/semantic_calibration.json

EXPOSE 6379 8000 8080 8265 10001
# KubeRay replaces the command with `ray start ...`; run on its own the image prints the CLI.
CMD ["tierserve", "--help"]
