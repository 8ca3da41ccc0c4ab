"""DALI's PyTorch iterator over a GPU pipeline (`plugin.pytorch`): CUDA tensors copied out of the
pipeline's outputs after their kernels, equal to what the pipeline itself returns, every sample of
the epoch once under PARTIAL (the CPU behaviour is tests/test_plugin_pytorch.py's)."""

from __future__ import annotations

import numpy as np
import pytest
from sources import ListSource  # module-level: pickles for spawn

from gpu.test_gpu_ops import _gpu_stack_ok, _jpegs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not _gpu_stack_ok(), reason="needs a GPU with CuPy and nvImageCodec"),
]

N, B = 20, 8  # two full batches and a partial one


def _pipe():
    from ray_extsrc import fn, pipeline_def

    @pipeline_def(batch_size=B, num_threads=2, device_id=0, seed=5, py_num_workers=2, py_start_method="spawn",
                  last_batch_policy="pad")
    def p():
        jpegs, labels = fn.external_source(ListSource(_jpegs(N), 1), num_outputs=2, batch=False, parallel=True,
                                           name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed")
        images = fn.resize(images, resize_x=64, resize_y=64)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=[128.0] * 3, std=[64.0] * 3,
                                          output_layout="CHW")
        return images, labels

    return p()


def test_classification_iterator_yields_cuda_tensors_equal_to_the_pipelines_outputs():
    torch = pytest.importorskip("torch")
    from ray_extsrc.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

    with _pipe() as ref:
        ref.build()
        want = [tuple(np.asarray(o.as_cpu().as_array()) for o in ref.run()) for _ in range(3)]
    with _pipe() as pipe:
        it = DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL)
        got = []
        for data in it:
            images, labels = data[0]["data"], data[0]["label"]
            assert images.is_cuda and images.device.index == 0 and images.dtype == torch.float32
            got.append((images.cpu().numpy(), labels.cpu().numpy()))
    assert [len(g[1]) for g in got] == [8, 8, 4]  # PARTIAL: the last batch cut to the epoch's end
    assert sorted(int(x) for g in got for x in g[1].ravel()) == list(range(N))
    for (gi, gl), (wi, wl) in zip(got, want):
        n = len(gl)
        np.testing.assert_array_equal(gl.ravel(), wl.ravel()[:n])
        np.testing.assert_array_equal(gi, wi[:n])  # the copy is the pipeline's output, bit for bit
