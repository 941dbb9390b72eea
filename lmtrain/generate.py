"""`lmtrain generate`: text from a prompt with a trained checkpoint."""

from __future__ import annotations

from lmtrain.config import GenerateConfig
from lmtrain.inference import load_model, load_run_tokenizer, sample_text


def run(cfg: GenerateConfig) -> list[str]:
    model, record = load_model(cfg.ckpt, cfg.device)
    tokenizer = load_run_tokenizer(cfg.ckpt, record)
    texts = []
    for i in range(cfg.num_samples):
        text = sample_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + i, strict=True)
        print(text if cfg.num_samples == 1 else f"--- sample {i} ---\n{text}", flush=True)
        texts.append(text)
    return texts
