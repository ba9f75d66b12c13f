"""The training loop, model adapters and data pipeline.

This package's ``__init__`` deliberately imports nothing: ``offload/``, ``planner/`` and
``parallel/`` import ``longtrain.trainer.model`` (the adapter) without pulling in the loop.
"""
