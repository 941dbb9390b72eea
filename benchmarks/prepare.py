"""Speed of `prepare` (load + split + tokenize + pack) with one process and with every core.

A first prepare trains the BPE tokenizer (untimed; it also warms the page cache). The timed
runs then reuse that tokenizer as `pretrained`, so they measure tokenizing and packing, not
BPE training, and both run side by side in this one process on the same input:

    python benchmarks/prepare.py                      # the python_stdlib corpus (~11 MB)
    python benchmarks/prepare.py --paths 'data/*.txt' # text files (.jsonl/.json/.parquet by extension)

Run it alone: another CPU-bound process on the machine skews the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from lmtrain.data import DataConfig, SourceKind, TextUnit, TokenizerConfig, TokenizerKind, load_meta, prepare_dataset


def _data_config(paths: Optional[List[str]], num_proc: int, cache_dir: str, max_documents: Optional[int]) -> DataConfig:
    if not paths:
        return DataConfig(num_proc=num_proc, cache_dir=cache_dir, max_documents=max_documents)
    suffix = Path(paths[0]).suffix
    source = {".jsonl": SourceKind.json, ".json": SourceKind.json, ".parquet": SourceKind.parquet}.get(
        suffix, SourceKind.text
    )
    return DataConfig(
        name="bench", source=source, paths=paths, text_unit=TextUnit.paragraph, num_proc=num_proc,
        cache_dir=cache_dir, max_documents=max_documents,
    )


def _quiet(_line: str) -> None:
    """Drop prepare's progress lines: only the measurements are printed."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="*", help="files or globs; default: the python_stdlib corpus")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-documents", type=int, default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-prepare-") as scratch:
        bpe = TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=args.vocab_size)
        warm = prepare_dataset(_data_config(args.paths, cores, f"{scratch}/bpe", args.max_documents), bpe, log=_quiet)
        pretrained = TokenizerConfig(kind=TokenizerKind.pretrained, path=str(warm / "tokenizer.json"))

        results = {}
        for num_proc in (1, cores):
            data = _data_config(args.paths, num_proc, f"{scratch}/np{num_proc}", args.max_documents)
            started = time.perf_counter()
            out = prepare_dataset(data, pretrained, log=_quiet)
            seconds = time.perf_counter() - started
            meta = load_meta(out)
            megabytes = (meta.train_bytes + meta.val_bytes) / 1e6
            results[num_proc] = megabytes / seconds
            print(
                f"num_proc={num_proc:<3d} {megabytes:7.1f} MB -> {meta.n_train_tokens + meta.n_val_tokens:,} tokens "
                f"in {seconds:6.2f} s: {megabytes / seconds:6.2f} MB/s"
            )
            assert (out / "train.bin").read_bytes() == (warm / "train.bin").read_bytes(), "num_proc changed the output"

    ratio = results[cores] / results[1]
    print(f"per core: {results[1]:.2f} MB/s; all {cores} cores: {results[cores]:.2f} MB/s; "
          f"ratio {ratio:.2f}x ({ratio / cores:.0%} of linear)")


if __name__ == "__main__":
    main()
