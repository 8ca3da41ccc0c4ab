# The ray_extsrc image for clusters: Ray's GPU image with this package and its `gpu` (CuPy,
# nvImageCodec/nvJPEG), `train` (torch) and `remote` (fsspec/s3fs readers) extras installed, so
# nodes start without a `pip install` at boot and every node runs the same code.
#
#   docker build -t ray-extsrc:0.1.0 .                                   # CUDA 12 (the default)
#   docker build -t ray-extsrc:0.1.0-cu13 --build-arg GPU_EXTRA=gpu-cu13 \
#       --build-arg RAY_IMAGE=<a CUDA 13 rayproject/ray tag> .           # CUDA 13 nodes
#   docker tag ray-extsrc:0.1.0 <registry>/ray-extsrc:0.1.0 && docker push <registry>/ray-extsrc:0.1.0
#
# cluster/ray-cluster.yaml and cluster/kuberay-raycluster.yaml name this image; point them at the
# registry you pushed to. Keep RAY_IMAGE's Ray version equal to the one you submit jobs from.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG GPU_EXTRA=gpu
# Only what the package needs to install; tests, benchmarks' results and caches stay out
# (.dockerignore). Ray's images run as the `ray` user, who owns its home and the Python env.
WORKDIR /home/ray/ray_extsrc
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ray_extsrc ./ray_extsrc
COPY --chown=ray:users examples ./examples
RUN python -m pip install --no-cache-dir ".[${GPU_EXTRA},train,remote]" \
 && python -c "import ray_extsrc, ray_extsrc.train, ray_extsrc.readers; print(ray_extsrc.__version__)" \
 && ray-extsrc --help > /dev/null

# 32 hardware work queues per CUDA context (the driver's default is 8), in every process of the
# node: a Train worker's GPU decode (nvJPEG, dozens of internal streams) then does not share queues
# with the training step's stream, which slowed the step's launches (cluster/README.md, "CUDA work
# queues"). The CUDA driver reads it when a process starts CUDA, so it belongs in the environment.
ENV CUDA_DEVICE_MAX_CONNECTIONS=32

# Loader workers exchange samples through memfd shared memory, which does not live in /dev/shm, so
# the container's default 64 MB /dev/shm no longer starves them; Ray's object store still prefers a
# large /dev/shm (see cluster/README.md, "Shared memory").
WORKDIR /home/ray
