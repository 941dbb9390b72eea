"""`lmtrain predict`: a fine-tuned checkpoint applied to one input — a label with its
probabilities (classify), an answer span (qa) or a translation (translate)."""

from __future__ import annotations

import torch

from lmtrain.config import PredictConfig
from lmtrain.data.examples import Collate, classify_ids, qa_windows, source_budget, translation_prompt
from lmtrain.task_eval import translate
from lmtrain.trained import TrainedModel, load_trained
from lmtrain.tasks.config import TaskKind


def require(value: str | None, name: str, kind: TaskKind, example: str) -> str:
    if not value:
        raise ValueError(f"{name} is not set; a task={kind.name} checkpoint predicts from it: {example}")
    return value


@torch.no_grad()
def run(cfg: PredictConfig) -> dict:
    loaded = load_trained(cfg.ckpt, cfg.device)
    match loaded.kind:
        case TaskKind.classify:
            result = predict_label(loaded, require(cfg.text, "text", loaded.kind, 'text="a gripping, funny film"'),
                                   cfg.text_pair)
            shown = ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
            print(f"{result['label']}   ({shown})", flush=True)
        case TaskKind.qa:
            example = 'question="who wrote it?" context="..."'
            result = predict_answer(loaded, require(cfg.question, "question", loaded.kind, example),
                                    require(cfg.context, "context", loaded.kind, example))
            print(result["answer"], flush=True)
        case TaskKind.translate:
            source = require(cfg.text, "text", loaded.kind, 'text="ein kleines Haus"')
            sp = loaded.specials()
            prompt = translation_prompt(loaded.tokenizer.encode(source), sp, source_budget(loaded.run.task, loaded.run.trainer.seq_len))
            result = {"translation": translate(loaded, prompt, cfg.beam_size or loaded.run.task.beam_size)}
            print(result["translation"], flush=True)
        case _:
            raise ValueError(
                f"checkpoint {cfg.ckpt} was trained for task={loaded.kind.name}; predict serves classify, qa and translate "
                "checkpoints (use lmtrain generate for a language model's text)"
            )
    return result


def predict_label(loaded: TrainedModel, text: str, pair: str | None) -> dict:
    sp = loaded.specials()
    tok = loaded.tokenizer
    ids = classify_ids(tok.encode(text), tok.encode(pair) if pair else None, sp, loaded.run.trainer.seq_len)
    batch = {k: v.to(loaded.device) for k, v in Collate(loaded.kind, sp.pad)([{"ids": ids, "label": 0}]).items()}
    probs = torch.softmax(loaded.module(batch)[0].float(), -1).tolist()
    names = loaded.run.label_names
    return {"label": names[max(range(len(probs)), key=probs.__getitem__)], "probabilities": dict(zip(names, probs))}


def predict_answer(loaded: TrainedModel, question: str, context: str) -> dict:
    from lmtrain.tasks.finetune import keep_best

    sp = loaded.specials()
    windows = qa_windows(loaded.tokenizer.encode(question), context, loaded.tokenizer, sp, loaded.run.task, loaded.run.trainer.seq_len)
    best: dict = {}
    items = [{**w, "example": 0} for w in windows]
    batch = {k: v.to(loaded.device) for k, v in Collate(loaded.kind, sp.pad)(items).items()}
    start, end = loaded.module(batch)
    for row, item in enumerate(items):
        keep_best(best, item, start[row].float().cpu(), end[row].float().cpu(), [(context, [])],
                  loaded.run.task.max_answer_tokens)
    score, answer = best.get(0, (float("-inf"), ""))
    return {"answer": answer, "score": score}
