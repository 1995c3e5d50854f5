# trainctl worker: a CUDA PyTorch base plus the [worker] extra (timm, scikit-learn...).
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t trainctl-worker .
#   docker build -f docker/worker.Dockerfile --build-arg BASE_IMAGE=pytorch/pytorch:<tag> .
#
# BASE_IMAGE must ship the torch that the [worker] extra's torchvision (0.29.x) requires,
# i.e. torch 2.15.x, built for a CUDA your driver supports. pip is constrained to the
# base's torch/torchvision/torchaudio builds, so it never re-resolves or re-downloads them:
# a base whose torch does not fit fails this build at `pip install` instead of silently
# pulling a second multi-GB torch from PyPI.
ARG BASE_IMAGE=pytorch/pytorch:2.15.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_DEVICE_ORDER=PCI_BUS_ID

WORKDIR /opt/trainctl/src
COPY pyproject.toml README.md ./
COPY trainctl ./trainctl
COPY server ./server
COPY workers ./workers
COPY client ./client

RUN pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio)==' > /opt/trainctl/base-torch.txt \
 && grep -iq '^torch==' /opt/trainctl/base-torch.txt \
 && cat /opt/trainctl/base-torch.txt \
 && pip install --constraint /opt/trainctl/base-torch.txt ".[worker]" \
 && pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio)==' | diff /opt/trainctl/base-torch.txt - \
 && python -c "import torch, torchvision, timm, sklearn, trainctl.workers.agent; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" \
 && trainctl worker --help >/dev/null \
 && cd / && rm -rf /opt/trainctl/src

COPY docker/worker-entrypoint.sh /usr/local/bin/trainctl-worker-entrypoint
RUN chmod 0755 /usr/local/bin/trainctl-worker-entrypoint \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/trainctl --shell /usr/sbin/nologin trainctl \
 && mkdir -p /var/lib/trainctl/runs /data \
 && chown -R trainctl /var/lib/trainctl /data
USER trainctl
WORKDIR /var/lib/trainctl
VOLUME ["/var/lib/trainctl/runs"]

ENTRYPOINT ["/usr/local/bin/trainctl-worker-entrypoint"]
CMD ["trainctl", "worker", "--workdir", "/var/lib/trainctl/runs"]
