"""The LightningModules of each task, and `make_task`: the one place a task is built from its parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmtrain.tasks.config import TaskConfig, TaskKind

if TYPE_CHECKING:
    from lmtrain.data.tokenizers import Tokenizer
    from lmtrain.distributed.parallelize import ParallelPlan
    from lmtrain.model import ModelConfig
    from lmtrain.optim import OptimConfig, ScheduleConfig
    from lmtrain.tasks.base import TaskModule


def make_task(task_cfg: TaskConfig, model_cfg: ModelConfig, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *,
              tokenizer: Tokenizer | None, label_names: list[str] | None, max_steps: int, seed: int, grad_clip: float,
              accumulate: int, record: dict, loss_chunk_tokens: int = 0, plan: ParallelPlan | None = None) -> TaskModule:
    """The LightningModule of task_cfg.kind (imported on use: each pulls only what it needs).
    tokenizer: masked_lm (vocabulary tables) and translate (eos); label_names: classify."""
    args = (model_cfg, optim_cfg, schedule_cfg)
    common = {"max_steps": max_steps, "seed": seed, "grad_clip": grad_clip, "accumulate": accumulate, "record": record,
              "plan": plan}
    match task_cfg.kind:
        case TaskKind.causal_lm:
            from lmtrain.tasks.causal_lm import CausalLMTask

            return CausalLMTask(*args, loss_chunk_tokens=loss_chunk_tokens, **common)
        case TaskKind.masked_lm:
            from lmtrain.data.tokenizers import special_id
            from lmtrain.tasks.masked_lm import MaskedLMTask, VocabTables

            vocab = VocabTables(tokenizer, model_cfg.padded_vocab_size, list(tokenizer.special_token_ids().values()),
                                mask_id=special_id(tokenizer, "<|mask|>", "task=masked_lm"))
            return MaskedLMTask(*args, task_cfg=task_cfg, vocab=vocab, **common)
        case TaskKind.classify:
            from lmtrain.tasks.finetune import ClassifyTask

            return ClassifyTask(*args, task_cfg=task_cfg, label_names=label_names, **common)
        case TaskKind.qa:
            from lmtrain.tasks.finetune import QATask

            return QATask(*args, task_cfg=task_cfg, **common)
        case TaskKind.translate:
            from lmtrain.tasks.finetune import TranslateTask

            return TranslateTask(*args, task_cfg=task_cfg, eos_id=tokenizer.eos_id, **common)
    raise ValueError(f"task.kind={task_cfg.kind} is not supported; use one of {[k.name for k in TaskKind]}")
