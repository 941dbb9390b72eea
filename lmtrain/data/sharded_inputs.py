"""The inputs of a sharded prepare: the files a corpus is read from, and the documents of one file.

The unit of work (and of output: one train and one val shard each) is one input file, so that the
result does not depend on how many tasks share the files. Local json/parquet/csv files are read with
datatrove's readers; hub datasets are streamed file by file through `datasets` (nothing is downloaded
whole), which reads local files alike, so a hub dataset and the same files on disk give the same tokens.

Documents are numbered, within their file, by their position among the rows that have text (a
non-empty string in data.text_column): what every reader yields, empty rows skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List

from lmtrain.data.config import DataConfig, SourceKind
from lmtrain.data.sources import explicit_val_source, resolve_local_files

# Roles of an input: `held_out` documents split by the keyed hash of data.val_fraction; `train` and
# `val` inputs go whole to one split (data.val_paths / data.hub_val_split name the val ones).
HELD_OUT, TRAIN, VAL = "held_out", "train", "val"
LOCAL_FORMATS = {SourceKind.json: "json", SourceKind.parquet: "parquet", SourceKind.csv: "csv"}
_HUB_FORMATS = ("json", "parquet", "csv", "text", "arrow")
_BATCH_ROWS = 1000


@dataclass(frozen=True)
class InputFile:
    index: int
    """Position in the sorted input list: names its shards (train/NNNNNN.bin, val/NNNNNN.bin)."""
    path: str
    """A local path, or what `datasets` reads for a hub file (an hf:// URL)."""
    role: str
    format: str
    """json, parquet or csv: the reader (for a hub file, the `datasets` builder that reads it)."""
    streaming: bool
    """Read through `datasets` streaming (hub files) rather than datatrove's readers (local files)."""

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_inputs(data: DataConfig) -> List[InputFile]:
    """Every input file of `data` in order: the train (or held-out) files, then the val files."""
    val_source = explicit_val_source(data)
    main_role = HELD_OUT if val_source is None else TRAIN
    files = _source_files(data, main_role)
    if val_source is not None:
        files += _source_files(val_source, VAL)
    return [InputFile(index=i, **fields) for i, fields in enumerate(files)]


def _source_files(data: DataConfig, role: str) -> List[dict]:
    match data.source:
        case SourceKind.json | SourceKind.parquet | SourceKind.csv:
            if data.source is SourceKind.csv and data.csv_delimiter != ",":
                raise ValueError(f"data.csv_delimiter={data.csv_delimiter!r}: a sharded prepare reads csv with ',' "
                                 "only; convert the files to json lines, or use prepare.executor=single")
            return [{"path": str(path), "role": role, "format": LOCAL_FORMATS[data.source], "streaming": False}
                    for path in resolve_local_files(data.paths, key="data.val_paths" if role == VAL else "data.paths")]
        case SourceKind.hub:
            split = data.hub_split
            return [{"path": path, "role": role, "format": fmt, "streaming": True}
                    for path, fmt in hub_data_files(data.hub_name, data.hub_config, split)]
    raise ValueError(
        f"data.source={data.source.name} cannot be prepared in shards (it is not a list of files); use data.source "
        "json, parquet, csv or hub, or prepare.executor=single"
    )


def hub_data_files(name: str, config: str | None, split: str) -> List[tuple[str, str]]:
    """(file, builder name) of each data file of a hub dataset's split, in the order `datasets` lists them.
    Also works on a local directory of data files (what the tests use)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as error:  # the hub raises many types; all mean the same to the user
        raise ValueError(
            f"could not resolve data.hub_name={name!r} data.hub_config={config!r}: {error}. Check the names on the "
            "hub and the network (or HF_HUB_OFFLINE=1 with a filled cache)"
        ) from error
    data_files = builder.config.data_files or {}
    if builder.name not in _HUB_FORMATS or split not in data_files:
        raise ValueError(
            f"hub dataset {name!r} (config {config!r}) is not a set of {'/'.join(_HUB_FORMATS)} data files with a "
            f"split {split!r} (builder {builder.name!r}, splits {list(data_files)}); a sharded prepare reads "
            "datasets file by file; use prepare.executor=single"
        )
    return [(str(path), builder.name) for path in data_files[split]]


def read_texts(source: InputFile, text_column: str) -> Iterator[str]:
    """The documents of one input file with text, in file order (rows whose text is empty or null skipped)."""
    if source.streaming:
        yield from _stream_texts(source, text_column)
        return
    reader = _datatrove_reader(source, text_column)
    for document in reader.read_file(Path(source.path).name):
        yield document.text


def _text_only(self, data: dict, path: str, id_in_file) -> dict:
    """datatrove reader adapter: keep the text only (the default copies every other field into metadata)."""
    text = data.get(self.text_key)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"data.text_column={self.text_key!r} of {path} holds {type(text).__name__}, not text; "
                         f"pick a string column among {sorted(data)}")
    return {"text": text or "", "id": str(id_in_file)}


def _datatrove_reader(source: InputFile, text_column: str):
    from datatrove.pipeline.readers import CSVReader, JsonlReader, ParquetReader

    folder = str(Path(source.path).parent)
    match source.format:
        case "json":
            return JsonlReader(folder, text_key=text_column, adapter=_text_only, add_file_path=False)
        case "parquet":
            # read_metadata=False reads just [text_key, id_key]: naming the text column twice reads that one column
            # (an "id" column the files may not have would fail).
            return ParquetReader(folder, text_key=text_column, id_key=text_column, read_metadata=False,
                                 adapter=_text_only)
        case "csv":
            return CSVReader(folder, text_key=text_column, adapter=_text_only)
    raise ValueError(f"input format {source.format!r} has no datatrove reader; use json, parquet or csv")


def _stream_texts(source: InputFile, text_column: str) -> Iterator[str]:
    import datasets

    stream = datasets.load_dataset(source.format, data_files=[source.path], split="train", streaming=True)
    for batch in stream.iter(batch_size=_BATCH_ROWS):
        if text_column not in batch:
            raise ValueError(f"data.text_column={text_column!r} is not a column of {source.path}; its columns are "
                             f"{sorted(batch)}; set data.text_column")
        for text in batch[text_column]:
            if text is not None and not isinstance(text, str):
                raise ValueError(f"data.text_column={text_column!r} of {source.path} holds {type(text).__name__}, "
                                 "not text; set data.text_column to a string column")
            if text:
                yield text
