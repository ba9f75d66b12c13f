"""The data pipeline: text -> tokens -> packed rows of ``seq_len`` -> resumable micro-batches.

    from longtrain.trainer.data import DataConfig, build_data

    tokenizer, loader = build_data(DataConfig(), seq_len=512, seed=0)
    mb = next(loader)  # MicroBatch: input_ids / labels / position_ids [b, s] int64

See ``pipeline.py`` for the steps and ``packing.py`` for the row layout.
"""

from longtrain.trainer.data.config import DataConfig
from longtrain.trainer.data.loader import MicroBatch, PackedLoader, eval_batches
from longtrain.trainer.data.packing import IGNORE_INDEX, PackedRows, pack_documents
from longtrain.trainer.data.pipeline import PackedData, build_data, build_datasets, train_loader
from longtrain.trainer.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "MicroBatch",
    "PackedData",
    "PackedLoader",
    "PackedRows",
    "Tokenizer",
    "build_data",
    "build_datasets",
    "eval_batches",
    "load_tokenizer",
    "pack_documents",
    "train_loader",
]
