"""Readers: ready-made sources that read a data set from storage, one module per format.

* `file_list` — DALI's external-source tutorial layout: ``root/file_list.txt`` of "name label"
  lines, each naming an encoded file under ``root``; `FileListSource` is the tutorial's
  ``ExternalInputCallable``, reusable.

A reader is a plain source (see `ray_extsrc.source`): it knows nothing of pipelines, workers or Ray,
and never imports the test-data generator (`ray_extsrc.synthetic` imports the readers instead).
"""

from .file_list import FILE_LIST, FileListSource, read_file_list

__all__ = ["FILE_LIST", "FileListSource", "read_file_list"]
