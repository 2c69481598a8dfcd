# Dataflow worker image, first version: Beam's Python 3.11 SDK image (which brings the
# boot program Dataflow starts) with this project installed the way README installs it.
# GPU workers need a CUDA base; that comes with the Dataflow/GPU work.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

WORKDIR /opt/hrnet-beam
COPY setup.py README.md ./
COPY pipeline pipeline
COPY transforms transforms
RUN pip install --no-cache-dir .

ENTRYPOINT ["/opt/apache/beam/boot"]
