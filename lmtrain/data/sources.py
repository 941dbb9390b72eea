"""Document sources: turn a DataConfig into a `datasets.Dataset` with one string column, `text`.

Every source yields documents in a fixed order (files sorted, rows in file order), so the
split and the packed token files are a pure function of the inputs.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from lmtrain.data.config import DataConfig, SourceKind

if TYPE_CHECKING:  # imported where documents are loaded: training never needs it
    import datasets

# Directories of the standard library that are not library code (or not ours to learn from).
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})
_GLOB_CHARS = frozenset("*?[")


def resolve_local_files(patterns: List[str], key: str = "data.paths") -> List[Path]:
    """Expand `~` and globs (`**` recurses); each pattern's matches sorted, duplicates dropped.

    Raises ValueError naming the first entry that matches nothing (as an entry of setting `key`).
    """
    files: Dict[Path, None] = {}  # an ordered set
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARS.intersection(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{key} entry '{pattern}' matches no file; fix the pattern or the directory")
        else:
            path = Path(expanded)
            if path.is_dir():
                raise ValueError(
                    f"{key} entry '{pattern}' is a directory; name its files with a glob, e.g. '{pattern}/*.txt'"
                )
            if not path.is_file():
                raise ValueError(f"{key} entry '{pattern}' does not exist; fix {key}")
            matches = [path]
        for match in matches:
            files[match.resolve()] = None
    return list(files)


def python_stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib_files() -> List[Path]:
    """Every *.py of this interpreter's standard library outside tests, idlelib and site-packages,
    sorted by path relative to the stdlib root."""
    root = python_stdlib_root()
    found = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        found.extend(Path(directory, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def source_identity(cfg: DataConfig) -> Dict[str, Any]:
    """What identifies the documents, for the prepared dataset's fingerprint. Local files count
    by resolved path, size and mtime, so editing a file makes a new dataset."""
    match cfg.source:
        case SourceKind.python_stdlib:
            return {"kind": cfg.source.name, "python": sys.version, "stdlib": str(python_stdlib_root())}
        case SourceKind.text | SourceKind.json | SourceKind.csv | SourceKind.parquet:
            files = []
            for path in resolve_local_files(cfg.paths):
                stat = path.stat()
                files.append([str(path), stat.st_size, stat.st_mtime_ns])
            identity = {"kind": cfg.source.name, "files": files}
            return {**identity, "delimiter": cfg.csv_delimiter} if cfg.source is SourceKind.csv else identity
        case SourceKind.hub:
            return {"kind": cfg.source.name, "name": cfg.hub_name, "config": cfg.hub_config, "split": cfg.hub_split}
    raise ValueError(f"data.source={cfg.source!r} is not handled; use one of {[k.name for k in SourceKind]}")


def explicit_val_source(cfg: DataConfig) -> Optional[DataConfig]:
    """The source of the validation documents when data.val_paths or data.hub_val_split names one
    (read like data.paths / data.hub_split); None when val is held out of the train source."""
    if cfg.val_paths:
        return dataclasses.replace(cfg, paths=list(cfg.val_paths), val_paths=[])
    if cfg.hub_val_split:
        return dataclasses.replace(cfg, hub_split=cfg.hub_val_split, hub_val_split=None)
    return None


def describe_source(cfg: DataConfig) -> str:
    """One line for logs and meta.json."""
    match cfg.source:
        case SourceKind.python_stdlib:
            return f"python_stdlib: *.py under {python_stdlib_root()} (Python {sys.version.split()[0]})"
        case SourceKind.text:
            return f"text files {cfg.paths}, one document per {cfg.text_unit.name}"
        case SourceKind.json | SourceKind.csv | SourceKind.parquet:
            return f"{cfg.source.name} files {cfg.paths}, column '{cfg.text_column}'"
        case SourceKind.hub:
            return f"hub dataset {cfg.hub_name} config {cfg.hub_config} split {cfg.hub_split}, column '{cfg.text_column}'"
    raise ValueError(f"data.source={cfg.source!r} is not handled; use one of {[k.name for k in SourceKind]}")


def load_documents(cfg: DataConfig, scratch_dir: Path) -> datasets.Dataset:
    """All documents of the source, empty ones included, as a Dataset with the column `text`.

    Local files are converted to Arrow under `scratch_dir` (thrown away after prepare); hub
    datasets use the normal Hugging Face cache, so a download is reused.
    """
    import datasets

    hf_cache = str(scratch_dir / "hf_datasets")
    match cfg.source:
        case SourceKind.python_stdlib:
            # ~11 MB: small enough to hold in memory; one document per file.
            texts = [path.read_text(encoding="utf-8", errors="replace") for path in python_stdlib_files()]
            return datasets.Dataset.from_dict({"text": texts})
        case SourceKind.text:
            files = [str(path) for path in resolve_local_files(cfg.paths)]
            for path in files:
                check_utf8_text(Path(path))
            return datasets.load_dataset(
                "text", data_files=files, sample_by=cfg.text_unit.name, split="train", cache_dir=hf_cache
            )
        case SourceKind.json | SourceKind.csv | SourceKind.parquet:
            loaded = load_local_table(cfg, cfg.paths, hf_cache)
            return _text_column(loaded, cfg.text_column, describe_source(cfg))
        case SourceKind.hub:
            return _text_column(load_hub_split(cfg, cfg.hub_split), cfg.text_column, describe_source(cfg))
    raise ValueError(f"data.source={cfg.source!r} is not handled; use one of {[k.name for k in SourceKind]}")


def check_utf8_text(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Refuse a file that is not UTF-8 text (a binary file, another encoding), naming the byte offset."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            if (nul := chunk.find(b"\0")) >= 0:
                raise ValueError(f"{path} is not a text file: a NUL byte at byte offset {offset + nul}; "
                                 "give data.paths only text files (or use data=jsonl_files / parquet_files)")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} is not UTF-8 text: byte 0x{chunk[e.start]:02x} at byte offset {offset + e.start} cannot be "
                    "decoded; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of data.paths"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: it ends inside a multi-byte character (byte offset {offset}); "
                         "the file is truncated or in another encoding") from None


def load_local_table(cfg: DataConfig, patterns: List[str], hf_cache: str) -> datasets.Dataset:
    """Rows of local json-lines, csv or parquet files, in file order."""
    import datasets

    files = [str(path) for path in resolve_local_files(patterns)]
    extra = {"delimiter": cfg.csv_delimiter} if cfg.source is SourceKind.csv else {}
    try:
        return datasets.load_dataset(cfg.source.name, data_files=files, split="train", cache_dir=hf_cache, **extra)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        raise ValueError(f"cannot read {cfg.source.name} files {patterns}: {error}; check data.source and the files") from error


def load_hub_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split)
    except Exception as error:  # the hub raises many types; all mean the same to the user
        raise ValueError(
            f"could not load data.hub_name={cfg.hub_name!r} data.hub_config={cfg.hub_config!r} split {split!r}: "
            f"{error}. Check the names on the hub, the network, or set HF_HUB_OFFLINE=1 with a filled Hugging Face cache"
        ) from error


def _text_column(dataset: datasets.Dataset, column: str, description: str) -> datasets.Dataset:
    import datasets

    """Keep only `column`, renamed to `text`; raise listing the columns when it is absent or not text."""
    if column not in dataset.column_names:
        raise ValueError(
            f"data.text_column={column!r} is not a column of {description}; its columns are "
            f"{dataset.column_names}; set data.text_column to the one holding the text"
        )
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"data.text_column={column!r} of {description} holds {feature}, not text; "
            f"pick a string column among {dataset.column_names}"
        )
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")
