"""Framework plugins with DALI's names: ``ray_extsrc.plugin.pytorch`` (DALIGenericIterator,
DALIClassificationIterator) over `ray_extsrc.plugin.base_iterator` (LastBatchPolicy and the epoch
accounting). Nothing is imported here: the PyTorch plugin loads torch, which the package does not
need otherwise.
"""
