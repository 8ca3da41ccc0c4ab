"""Deprecated alias: the readers live in `ray_extsrc.readers` now (``from ray_extsrc.readers import
FileListSource``). Kept, without a warning (the test suite turns warnings into errors), until the last
importers move: ``ray_extsrc/cli.py``, ``tests/test_pipeline_ops.py``, ``benchmarks/_extsrc_runner.py``."""

from .readers.file_list import FileListSource

__all__ = ["FileListSource"]
