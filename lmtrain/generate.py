"""`lmtrain generate`: text from a prompt with a trained checkpoint (a translation for a task=translate one)."""

from __future__ import annotations

from pathlib import Path

from lmtrain.checkpoint import load_record
from lmtrain.config import GenerateConfig
from lmtrain.inference import load_model, load_run_tokenizer, sample_text, task_kind


def run(cfg: GenerateConfig) -> list[str]:
    kind = task_kind(load_record(Path(cfg.ckpt))["lmtrain"])
    if kind == "translate":
        return [translate_prompt(cfg)]
    if kind != "causal_lm":
        raise ValueError(f"checkpoint {cfg.ckpt} was trained for task={kind}, which does not generate text; "
                         "use lmtrain predict (classify, qa) or lmtrain eval")
    model, record = load_model(cfg.ckpt, cfg.device)
    tokenizer = load_run_tokenizer(cfg.ckpt, record)
    texts = []
    for i in range(cfg.num_samples):
        text = sample_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + i, strict=True)
        print(text if cfg.num_samples == 1 else f"--- sample {i} ---\n{text}", flush=True)
        texts.append(text)
    return texts


def translate_prompt(cfg: GenerateConfig) -> str:
    """A translation checkpoint: the prompt is the source sentence; decoded with beam search."""
    from lmtrain.data.examples import source_budget, translation_prompt
    from lmtrain.task_eval import load_task, translate

    loaded = load_task(cfg.ckpt, cfg.device)
    prompt = translation_prompt(loaded.tokenizer.encode(cfg.prompt), loaded.specials(),
                                source_budget(loaded.task_cfg, loaded.seq_len))
    text = translate(loaded, prompt, cfg.beam_size or loaded.task_cfg.beam_size)
    print(text, flush=True)
    return text
