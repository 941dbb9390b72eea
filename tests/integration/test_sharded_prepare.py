"""`lmtrain prepare prepare.executor=local`: datatrove tasks writing one train and one val shard per input file.

The corpora are generated here (jsonl files with blank and empty rows); nothing needs ../shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from lmtrain_testing import (TINY_TRAIN, communicate, compose, losses_by_step, meta_without_time, prepare_sharded_in_process, run_cli,
                             sharded_overrides, start_cli, tokens_of, train_in_process, write_jsonl_corpus)

pytest.importorskip("datatrove")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl_corpus(tmp_path_factory.mktemp("sharded") / "jsonl")


@pytest.fixture(scope="module")
def one_task(corpus, tmp_path_factory) -> Path:
    """The reference: one local task."""
    return prepare_sharded_in_process(sharded_overrides(corpus, tmp_path_factory.mktemp("one"), "prepare.executor=local", "prepare.tasks=1"))


def test_three_tasks_write_what_one_task_writes(corpus, one_task, tmp_path):
    three = prepare_sharded_in_process(sharded_overrides(corpus, tmp_path, "prepare.executor=local", "prepare.tasks=3",
                                         "prepare.workers=2"))
    assert three.name == one_task.name  # the number of tasks is not in the fingerprint
    for mine, reference in zip(tokens_of(three), tokens_of(one_task)):
        assert len(reference) > 1000 and np.array_equal(mine, reference)
    assert meta_without_time(three) == meta_without_time(one_task)
    assert (three / "tokenizer.json").read_bytes() == (one_task / "tokenizer.json").read_bytes()
    assert sorted((three / "logs" / "tasks-3" / "completions").iterdir()) != []
    assert not list(three.rglob("*.tmp")) and not (three / "records").exists()


def test_meta_records_the_input_file_of_every_shard(corpus, one_task):
    meta = json.loads((one_task / "meta.json").read_text())
    files = sorted(str(p) for p in corpus.glob("*.jsonl"))
    assert [f["path"] for f in meta["inputs"]["files"]] == files
    for split in ("train", "val"):
        shards = meta["shards"][split]
        assert [s["inputs"] for s in shards] == [[f] for f in files]
        assert [s["file"] for s in shards] == [f"{split}/{i:06d}.bin" for i in range(len(files))]
        assert sum(s["n_tokens"] for s in shards) == meta[f"n_{split}_tokens"]
    # every non-blank row is a document, in one split or the other; val is about data.val_fraction of them
    rows = [json.loads(line)["text"] for f in files for line in Path(f).read_text().splitlines()]
    n_documents = sum(1 for text in rows if text.strip())
    assert meta["n_train_docs"] + meta["n_val_docs"] == n_documents
    assert 0.03 < meta["n_val_docs"] / n_documents < 0.2


def test_shards_hold_each_document_of_its_file_in_order(corpus, tmp_path):
    """With the byte tokenizer the token space is the documents' bytes: check it against the files and the split."""
    from lmtrain.data.splits import compute_document_is_val

    directory = prepare_sharded_in_process(sharded_overrides(corpus, tmp_path, "tokenizer=byte", "prepare.executor=local",
                                             "prepare.tasks=2", "prepare.workers=1"))
    expected = {"train": [], "val": []}
    for index, path in enumerate(sorted(corpus.glob("*.jsonl"))):
        texts = [t for t in (json.loads(line)["text"] for line in path.read_text().splitlines()) if t]
        is_val = compute_document_is_val(index, np.arange(len(texts)), 0.1, 1234)
        for text, val in zip(texts, is_val):
            if text.strip():
                expected["val" if val else "train"].append(list(text.encode("utf-8")) + [256])
    train, val = tokens_of(directory)
    assert train.tolist() == sum(expected["train"], []) and val.tolist() == sum(expected["val"], [])


def test_a_killed_task_is_redone_and_its_partial_shard_never_used(corpus, one_task, tmp_path):
    args = ["prepare", *sharded_overrides(corpus, tmp_path, "prepare.executor=local", "prepare.tasks=3", "prepare.workers=1")]
    work = tmp_path / f"{one_task.name}.work"
    log = tmp_path / "killed.log"
    killed = start_cli(args, cwd=tmp_path, env={"LMTRAIN_PREPARE_FAULT": "kill:1"}, log=log)
    communicate(killed, what="the prepare whose task is killed", watch=[log, tmp_path])
    # datatrove's multiprocess Manager outlives the killed process (as it would for a user): end it, it is in
    # the killed process's group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (work / "train" / "000001.bin.tmp").is_file()  # the killed task's half-written shard
    assert not (work / "train" / "000001.bin").exists() and not (work / "meta.json").exists()
    completions = work / "logs" / "tasks-3" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000"]
    assert not (tmp_path / one_task.name).exists()

    rerun = run_cli(args, cwd=tmp_path)
    assert "Skipping 1 already completed tasks" in rerun.stderr
    done = tmp_path / one_task.name
    assert sorted(p.name for p in (done / "logs" / "tasks-3" / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert not list(done.rglob("*.tmp")) and not work.exists()
    for mine, reference in zip(tokens_of(done), tokens_of(one_task)):
        assert np.array_equal(mine, reference)
    assert meta_without_time(done) == meta_without_time(one_task)


def test_streamed_hub_files_equal_the_local_read(corpus, one_task, tmp_path):
    """source=hub streams each data file through `datasets` (here a local directory stands in for the hub)."""
    streamed = prepare_sharded_in_process(sharded_overrides(corpus, tmp_path, "data.source=hub", f"data.hub_name={corpus}",
                                            "data.paths=[]", "prepare.executor=local", "prepare.tasks=2"))
    meta = json.loads((streamed / "meta.json").read_text())
    assert all(f["streaming"] for f in meta["inputs"]["files"]) and len(meta["inputs"]["files"]) == 5
    assert meta["tokenizer_hash"] == json.loads((one_task / "meta.json").read_text())["tokenizer_hash"]
    for mine, reference in zip(tokens_of(streamed), tokens_of(one_task)):
        assert np.array_equal(mine, reference)


def test_lmtrain_trains_on_a_sharded_dataset(corpus, one_task, tmp_path):
    """By data.prepared=<dir>, and by the same data.* and tokenizer.* settings that prepared it."""
    for name, data in (("by-dir", [f"data.prepared={one_task}"]), ("by-settings", sharded_overrides(corpus, one_task.parent))):
        run_dir = train_in_process([*data, *TINY_TRAIN, "trainer.max_steps=3", "trainer.accelerator=cpu",
                                    "trainer.val_every_steps=3"], tmp_path / "runs" / name)
        assert sorted(losses_by_step(run_dir)) == [1, 2, 3]
        from lmtrain.trained import read_record

        assert read_record(run_dir / "checkpoints" / "last.ckpt").data_dir == one_task


@pytest.mark.parametrize("args, message", [
    (["prepare.executor=slurm"], "prepare.slurm_partition"),
    (["prepare.executor=local", "prepare.tasks=0"], "prepare.tasks=0"),
    (["prepare.executor=slurm", "prepare.slurm_partition=debug", "prepare.slurm_mem_per_cpu=lots"], "'lots'"),
])
def test_bad_execution_settings_name_the_setting(corpus, tmp_path, args, message):
    from lmtrain.config import to_typed

    with pytest.raises(ValueError, match=message):
        to_typed(compose("prepare", sharded_overrides(corpus, tmp_path, *args)))


def test_max_documents_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="data.max_documents=10"):
        prepare_sharded_in_process(sharded_overrides(corpus, tmp_path, "data.max_documents=10", "prepare.executor=local"))
