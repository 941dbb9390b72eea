"""Session fixtures; the helpers they use live in lmtrain_testing.py (importable from every test dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmtrain_testing import cli_in_process, compose, data_overrides, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def prepared(corpus_dir: Path) -> list[str]:
    """Overrides naming a prepared byte-level corpus (prepared once per session, in-process)."""
    corpus = write_corpus(corpus_dir / "text")
    overrides = data_overrides(corpus, corpus_dir / "cache")
    cfg = compose("prepare", overrides)
    from lmtrain.config import to_typed
    from lmtrain.data.prepare import prepare_dataset

    typed = to_typed(cfg)
    prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)
    return overrides


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """W&B run inside this process (a run trained in-process with logger.wandb) starts a wandb service
    and names it in os.environ["WANDB_SERVICE"]; every lmtrain process a later test starts would
    inherit it and share that service's runs (a SIGKILLed attempt's run id then stays "in use").
    Such a test ends with the service torn down and the variable gone."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if before is None and "WANDB_SERVICE" in os.environ:
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(args, cwd) -> CompletedProcess: the real `lmtrain` entry point run in this process."""

    def run(args: list[str], cwd: Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        return cli_in_process(args, monkeypatch, capsys)

    return run
