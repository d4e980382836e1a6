"""Datasets (registered as kind ``dataset``), collate functions and resumable batching."""

from mmgpt.data import (  # noqa: F401
    imagefolder,
    llava,
    parquet,
    preference,
    shapes,
    shards,
    text,
)
from mmgpt.data.sample import Sample, Turn  # noqa: F401
