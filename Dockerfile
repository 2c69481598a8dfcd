# Dataflow worker image for GPU (and CPU) workers.
#   Python 3.11 + TensorFlow with its CUDA libraries from PyPI (tensorflow[and-cuda]); the
#   NVIDIA driver itself comes from the host (service option install-nvidia-driver).
#   Beam's boot program, which Dataflow starts, is copied from Beam's own SDK image of the
#   same Beam version as setup.py pins (tests/job/test_dataflow.py checks they agree).
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk

FROM python:3.11-slim
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam

WORKDIR /opt/hrnet-beam
COPY setup.py README.md ./
COPY pipeline pipeline
COPY transforms transforms
RUN pip install --no-cache-dir ".[optimize]" "tensorflow[and-cuda]==2.21.0"

ENTRYPOINT ["/opt/apache/beam/boot"]
