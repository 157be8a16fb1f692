"""FineViT-VL data: one record schema, sources that stream records, and rendering of records into chat messages.

The data path flows one way::

    source (JSONL / WebDataset / HF / mixture)  ->  (record, location)
    load_record_images(record, location)        ->  validated record + upright RGB images, width/height filled
    record_to_messages(record, W, H)            ->  HF chat messages with {"type": "image"} items (no tokenizer)

`finevit_vl.data.synthetic` (``finevit-vl make-data``) writes a small fine-grained data set in this schema plus
benchmark-format evaluation files, from the scenes drawn by `finevit_vl.data.scenes`.
"""

from .images import load_record_images, open_image
from .render import record_to_messages
from .schema import TASKS, BadRecordError, Record, record_images, validate_record
from .sources import (
    HFDatasetSource,
    HFDatasetSourceConfig,
    JsonlSource,
    JsonlSourceConfig,
    MixtureSource,
    MixtureSourceConfig,
    RecordSource,
    Source,
    SourceConfig,
    WebDatasetSource,
    WebDatasetSourceConfig,
    build_source,
    resolve_source_paths,
)


__all__ = [
    "TASKS",
    "BadRecordError",
    "HFDatasetSource",
    "HFDatasetSourceConfig",
    "JsonlSource",
    "JsonlSourceConfig",
    "MixtureSource",
    "MixtureSourceConfig",
    "Record",
    "RecordSource",
    "Source",
    "SourceConfig",
    "WebDatasetSource",
    "WebDatasetSourceConfig",
    "build_source",
    "load_record_images",
    "open_image",
    "record_images",
    "record_to_messages",
    "resolve_source_paths",
    "validate_record",
]
