"""Task metrics computed the way their reference implementations define them.

- Extractive QA: exact match and F1 over normalised answer tokens, the maximum over the gold
  answers, as the official SQuAD v1.1 evaluation script defines them (Rajpurkar et al. 2016):
  lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace.
- Translation: corpus BLEU from sacrebleu (Post 2018) with its default 13a tokenisation.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty (an unanswerable question answered as such) scores 1
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """Mean EM and F1 (percent) over the examples in `references`; a missing prediction scores 0."""
    em = f1 = 0.0
    for key, golds in references.items():
        golds = golds or [""]
        prediction = predictions.get(key, "")
        em += max(exact_match(prediction, g) for g in golds)
        f1 += max(token_f1(prediction, g) for g in golds)
    n = max(1, len(references))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
