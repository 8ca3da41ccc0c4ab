"""DALI's tutorial "Parallel External Source - Fork", on ray_extsrc.

The tutorial's code below is unchanged except for its imports (``nvidia.dali`` -> ``ray_extsrc``)
and ``display()``, which saves a PNG instead of drawing with matplotlib. The preamble generates a
small JPEG set and changes directory so that the tutorial's ``"../../data/images/"`` finds it.
Runs on a machine without a GPU: ``device="mixed"`` decoding then runs on the CPU (one warning).

    python examples/parallel_external_source_fork.py [--out DIR] [--data SPEC]

``--data`` runs the tutorial's pipelines on a data set of yours instead: a folder with a
``file_list.txt``, a class-folder tree (ImageFolder layout), WebDataset shards
(``shards/shard-{000000..000009}.tar``) or an fsspec URL of one of these (``s3://``, ``https://``).
The two lines added to the tutorial for it are marked.
"""

import argparse
import functools
import os
import sys

from ray_extsrc.display import save_grid
from ray_extsrc.readers import open_dataset
from ray_extsrc.synthetic import SMALL, make_jpeg_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="demo-output/tutorial", help="where the images and the PNGs go")
parser.add_argument("--data", help="a folder, class-folder tree, shard pattern or URL to read instead of the "
                                   "generated set (see ray_extsrc.readers.open_dataset)")
args = parser.parse_args()
if args.data:  # local paths made absolute before the chdir below
    args.data = "::".join(p if "://" in p else os.path.abspath(p) for p in args.data.split("::"))
workdir = os.path.abspath(args.out)
make_jpeg_dataset(os.path.join(workdir, "data", "images"), SMALL, progress=False)
os.makedirs(os.path.join(workdir, "notebooks", "general"), exist_ok=True)
os.chdir(os.path.join(workdir, "notebooks", "general"))  # so "../../data/images/" is our set

# ---- the tutorial, imports changed -------------------------------------------------------------
import numpy as np  # noqa: E402
from ray_extsrc import pipeline_def  # noqa: E402
import ray_extsrc.fn as fn  # noqa: E402
import ray_extsrc.types as types  # noqa: E402

batch_size = 4


class ExternalInputCallable:
    def __init__(self, batch_size):
        self.images_dir = "../../data/images/"
        self.batch_size = batch_size
        with open(self.images_dir + "file_list.txt", "r") as f:
            file_label = [line.rstrip().split(" ") for line in f if line != ""]
            self.files, self.labels = zip(*file_label)
        self.full_iterations = len(self.files) // batch_size

    def __call__(self, sample_info):
        sample_idx = sample_info.idx_in_epoch
        if sample_info.iteration >= self.full_iterations:
            # Indicate end of the epoch
            raise StopIteration()
        jpeg_filename = self.files[sample_idx]
        label = np.int32([self.labels[sample_idx]])
        with open(self.images_dir + jpeg_filename, "rb") as f:
            encoded_img = np.frombuffer(f.read(), dtype=np.uint8)
        return encoded_img, label


if args.data:  # not in the tutorial: --data swaps in a ready-made reader with the same contract
    ExternalInputCallable = functools.partial(open_dataset, args.data)  # noqa: F811 - (batch_size) -> a reader


@pipeline_def(
    batch_size=batch_size, num_threads=2, device_id=0, py_num_workers=4
)
def training_pipeline():
    jpegs, labels = fn.external_source(
        source=ExternalInputCallable(batch_size),
        num_outputs=2,
        batch=False,
        parallel=True,
        dtype=[types.UINT8, types.INT32],
    )
    decode = fn.decoders.image(jpegs, device="mixed")
    contrast = fn.random.uniform(range=(1, 3.0))
    enhance = fn.brightness_contrast(decode, contrast=contrast)
    return enhance, labels


@pipeline_def(
    batch_size=batch_size, num_threads=2, device_id=0, py_num_workers=4
)
def validation_pipeline():
    jpegs, labels = fn.external_source(
        source=ExternalInputCallable(batch_size),
        num_outputs=2,
        batch=False,
        parallel=True,
        dtype=[types.UINT8, types.INT32],
    )
    decode = fn.decoders.image(jpegs, device="mixed")
    enhance = fn.brightness_contrast(decode, contrast=1.5)
    return enhance, labels


saved = []


def display(outputs, count, columns=2, captions=None, cpu=False):
    images = [outputs.at(i) if cpu else outputs.as_cpu().at(i) for i in range(count)]
    path = os.path.join(workdir, f"batch_{len(saved)}.png")
    saved.append(save_grid(images, path, columns=columns, captions=captions))


train_pipe = training_pipeline()
val_pipe = validation_pipeline()

pipelines = [train_pipe, val_pipe]

for pipe in pipelines:
    pipe.start_py_workers()

for pipe in pipelines:
    pipe.build()

train_out = train_pipe.run()
val_out = val_pipe.run()

display(train_out[0], batch_size)
display(val_out[0], batch_size)
# ---- end of the tutorial -----------------------------------------------------------------------

for pipe in pipelines:
    pipe.close()
print(f"labels: train {train_out[1].as_array().ravel().tolist()}, val {val_out[1].as_array().ravel().tolist()}")
print("saved:", *saved, sep="\n  ", file=sys.stdout)
