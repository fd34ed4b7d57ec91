# Triton with what the student's Python backend imports (torch, transformers, peft, the student runtime),
# installed at build time at the versions the test suite runs: nothing is installed when the container starts.
FROM nvcr.io/nvidia/tritonserver:24.10-py3
ARG TORCH_SPEC="torch==2.13.0"
COPY infra/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir "${TORCH_SPEC}" \
    && pip install --no-cache-dir -c /tmp/constraints.txt transformers peft accelerate \
    && rm /tmp/constraints.txt
COPY services /opt/slm-flywheel/services
COPY schemas /opt/slm-flywheel/schemas
ENV PYTHONPATH=/opt/slm-flywheel \
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=536870912
