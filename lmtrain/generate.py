"""`lmtrain generate`: text from a prompt with a trained checkpoint (a translation for a task=translate one)."""

from __future__ import annotations

from lmtrain.config import GenerateConfig
from lmtrain.inference import sample_text
from lmtrain.tasks.config import TaskKind
from lmtrain.trained import TrainedModel, load_trained, read_record


def run(cfg: GenerateConfig) -> list[str]:
    kind = read_record(cfg.ckpt).kind
    if kind not in (TaskKind.translate, TaskKind.causal_lm):
        raise ValueError(f"checkpoint {cfg.ckpt} was trained for task={kind.name}, which does not generate text; "
                         "use lmtrain predict (classify, qa) or lmtrain eval")
    trained = load_trained(cfg.ckpt, cfg.device)
    if kind is TaskKind.translate:
        return [translate_prompt(trained, cfg)]
    model, tokenizer = trained.model, trained.tokenizer
    texts = []
    for i in range(cfg.num_samples):
        text = sample_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + i, strict=True)
        print(text if cfg.num_samples == 1 else f"--- sample {i} ---\n{text}", flush=True)
        texts.append(text)
    return texts


def translate_prompt(loaded: TrainedModel, cfg: GenerateConfig) -> str:
    """A translation checkpoint: the prompt is the source sentence; decoded with beam search."""
    from lmtrain.data.examples import source_budget, translation_prompt
    from lmtrain.task_eval import translate

    prompt = translation_prompt(loaded.tokenizer.encode(cfg.prompt), loaded.specials(),
                                source_budget(loaded.run.task, loaded.run.trainer.seq_len))
    text = translate(loaded, prompt, cfg.beam_size or loaded.run.task.beam_size)
    print(text, flush=True)
    return text
