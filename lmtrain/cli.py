"""The `lmtrain` command: `lmtrain <subcommand> [GROUP=OPTION] [KEY=VALUE ...]`.

Each subcommand is a Hydra app over conf/. This is the only module that sees a DictConfig: it
turns it into the subcommand's typed config and hands that down.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # imported in main(), after the requeue-signal handler is in place
    from omegaconf import DictConfig

COMMANDS = {
    "prepare": "tokenize and pack a corpus (data=..., tokenizer=...)",
    "train": "pretrain or fine-tune a model (task=..., model=..., data=..., trainer.max_steps=...)",
    "generate": "sample text from a checkpoint (ckpt=... prompt=...)",
    "eval": "a checkpoint's metrics on its val split: loss/ppl/bpb, masked acc, accuracy+F1, EM+F1, BLEU (ckpt=...)",
    "predict": "a fine-tuned checkpoint on one input (ckpt=... text=... | question=... context=...)",
    "submit": "render, check and sbatch a training job (cluster=<site> slurm.nodes=... [--dry-run])",
    "sweep": "a resumable Optuna search whose trials are lmtrain runs (sweep=<spec> launcher=local|slurm)",
    "plot": "PNG curves of a run's loss, lr, tokens/s and grad norm (run=runs/<run> [out=DIR])",
    "sweep-report": "a sweep's trials best first, trials.csv and objective-vs-parameter plots (sweep_dir=sweeps/<name>)",
    "plan": "per-GPU memory of a model, strategy and batch; the cheapest strategy that fits",
    "harness": "lm-evaluation-harness tasks on a checkpoint, no export step (ckpt=... tasks=[arc_easy,hellaswag])",
    "inspect": "attention maps, logit lens, surprisal and attributions of one text, as PNGs (ckpt=... text=...)",
    "export": "any strategy's checkpoint as one state dict or a checked Hugging Face model (ckpt=... format=torch|safetensors|hf)",
}
# Lightning's launcher re-runs this program for ranks 1..N-1 with sys.argv[1:] minus nothing we
# could add; the subcommand travels to those children in the environment instead.
_COMMAND_ENV = "LMTRAIN_COMMAND"


def _prepare(cfg: DictConfig) -> None:
    from lmtrain.config import to_typed
    from lmtrain.data.prepare import prepare_dataset

    typed = to_typed(cfg)
    if typed.prepare.executor.name == "single":
        out = prepare_dataset(typed.data, typed.tokenizer, force=typed.force)
    else:
        try:
            from lmtrain.data.sharded_prepare import prepare_sharded
        except ModuleNotFoundError as error:
            if error.name != "datatrove":
                raise
            raise ValueError(f"prepare.executor={typed.prepare.executor.name} runs on datatrove, which is not "
                             "installed; pip install 'lmtrain[datatrove]', or use prepare.executor=single") from None
        out = prepare_sharded(typed.data, typed.tokenizer, typed.prepare, force=typed.force)
        if out is None:
            return
    print(f"prepared: {out}", flush=True)


def _train(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lmtrain.config import launcher_rank, to_record, to_typed
    from lmtrain.train import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed = to_typed(cfg)
    except ValueError:
        # Hydra made the run dir before the config could be checked: a new run that never started
        # leaves nothing behind.
        if not any(run_dir.iterdir()) and launcher_rank() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    hydra = HydraConfig.get()
    # Hydra's record of the invocation, as its output_subdir would hold it; written by the run's owner.
    hydra_files = {".hydra/config.yaml": OmegaConf.to_yaml(cfg), ".hydra/hydra.yaml": OmegaConf.to_yaml({"hydra": hydra}),
                   ".hydra/overrides.yaml": OmegaConf.to_yaml(list(hydra.overrides.task))}
    run(typed, to_record(cfg), run_dir, hydra_files=hydra_files)


def _submit(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from lmtrain.config import to_typed
    from lmtrain.submit import run

    run(to_typed(cfg), list(HydraConfig.get().overrides.task))


# Commands whose runner takes just their typed config: "module:function", imported on use so that
# `lmtrain generate` does not pay for the training stack's imports.
_TYPED_RUNNERS = {
    "generate": "lmtrain.generate:run",
    "eval": "lmtrain.evaluate:run",
    "predict": "lmtrain.predict:run",
    "export": "lmtrain.export:run",
    "inspect": "lmtrain.inspection:run",
    "harness": "lmtrain.harness:run",
    "sweep": "lmtrain.sweep:run",
    "plot": "lmtrain.reports:run_plot",
    "sweep-report": "lmtrain.reports:run_sweep_report",
    "plan": "lmtrain.distributed.plan:run",
}


def _typed_runner(target: str) -> Callable[[DictConfig], None]:
    module, function = target.split(":")

    def app(cfg: DictConfig) -> None:
        from lmtrain.config import to_typed

        getattr(importlib.import_module(module), function)(to_typed(cfg))

    return app


_APPS: dict[str, Callable[[DictConfig], None]] = {
    "prepare": _prepare, "train": _train, "submit": _submit,
    **{name: _typed_runner(target) for name, target in _TYPED_RUNNERS.items()},
}


def _report_errors(fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Bad input ends with one clear line and exit code 2, not a traceback (LMTRAIN_DEBUG=1 shows it)."""

    def wrapped(cfg: DictConfig) -> None:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from omegaconf.errors import OmegaConfBaseException

        from lmtrain.checkpoint import CheckpointError
        from lmtrain.config_errors import describe

        try:
            fn(cfg)
        except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError, MisconfigurationException,
                OmegaConfBaseException) as e:
            if os.environ.get("LMTRAIN_DEBUG"):
                raise
            message = describe(e) if isinstance(e, OmegaConfBaseException) else str(e)
            if message is None:
                raise
            print(f"lmtrain: error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapped


# Keys whose values are free text (a prompt, a sentence): `prompt="def parse("` reaches us from a
# shell as `prompt=def parse(`, which Hydra's override grammar rejects; such a value is quoted for it.
FREE_TEXT_KEYS = ("prompt", "text", "text_pair", "question", "context", "trainer.sample_prompt", "logger.inspect_text")


def quote_free_text(arg: str) -> str:
    key, sep, value = arg.partition("=")
    if not sep or key not in FREE_TEXT_KEYS or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
        return arg
    # Hydra's quoted strings: backslashes are literal except before a quote or at the end.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"{key}='{escaped}'"


def hydra_args(command: str, args: list[str]) -> list[str]:
    """The command line as Hydra's override parser takes it."""
    args = ["dry_run=true" if a == "--dry-run" else a for a in args] if command == "submit" else args
    return [quote_free_text(a) for a in args]


def usage() -> str:
    lines = ["usage: lmtrain <command> [GROUP=OPTION] [KEY=VALUE ...]   (lmtrain <command> --help for its options)", ""]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
    elif os.environ.get(_COMMAND_ENV) in COMMANDS and "LOCAL_RANK" in os.environ:
        command, rest = os.environ[_COMMAND_ENV], argv  # a child process started by Lightning
    else:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    os.environ[_COMMAND_ENV] = command
    if command == "train" and "SLURM_JOB_ID" in os.environ:
        from lmtrain.distributed import preemption  # before torch's import: a signal then must not kill us

        preemption.install(preemption.requeue_signal())
    import hydra  # the imports of everything else start here, with the signal handler in place

    from lmtrain.config import conf_dir, register_configs

    register_configs()
    app = hydra.main(config_path=str(conf_dir()), config_name=command.replace("-", "_"), version_base="1.3")(_report_errors(_APPS[command]))
    rest = hydra_args(command, rest)
    sys.argv = [sys.argv[0], *rest]  # Hydra parses sys.argv
    # Hydra's errors reach us whole (it would print a traceback, or a hint to add a typo'd key with
    # `+`): a config mistake becomes one line, anything else keeps its traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        app()
    except Exception as e:
        from lmtrain.config_errors import describe

        message = None if os.environ.get("LMTRAIN_DEBUG") else describe(e)
        if message is None:
            raise
        print(f"lmtrain: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
