"""ray_extsrc: DALI's parallel external source, rebuilt on Ray.

Public API::

    from ray_extsrc import pipeline_def, fn, types
"""

from . import types
from .errors import (
    DecodeError,
    ForkAfterCUDAError,
    LifecycleError,
    RayExtSrcError,
    SampleError,
    SharedMemoryError,
    SourceError,
    WorkerDiedError,
)
from .pipeline import NoGPUWarning, Pipeline, pipeline_def
from .sample_errors import TooManyBadSamplesError
from .tensors import TensorListCPU, TensorListGPU
from .types import BatchInfo, SampleInfo

__version__ = "0.1.0"

__all__ = [
    "BatchInfo",
    "DecodeError",
    "ForkAfterCUDAError",
    "LifecycleError",
    "Loader",
    "NoGPUWarning",
    "Pipeline",
    "RayExtSrcError",
    "SampleError",
    "SampleInfo",
    "SharedMemoryError",
    "SourceError",
    "TensorListCPU",
    "TensorListGPU",
    "TooManyBadSamplesError",
    "WorkerDiedError",
    "fn",
    "pipeline_def",
    "types",
]


def __getattr__(name: str):
    # fn pulls in the op implementations (simplejpeg, Pillow), Loader pulls in Ray: load on first use.
    import importlib

    if name == "fn":
        return importlib.import_module(".fn", __name__)
    if name == "Loader":
        return importlib.import_module(".train", __name__).Loader
    raise AttributeError(f"module 'ray_extsrc' has no attribute {name!r}")
