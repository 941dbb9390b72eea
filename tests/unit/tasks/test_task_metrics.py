"""Task metrics against their definitions: SQuAD EM/F1, accuracy and macro-F1 equal to
torchmetrics', BLEU from sacrebleu."""

from __future__ import annotations

import pytest
import torch

from lmtrain.tasks.finetune import best_span, classification_scores
from lmtrain.tasks.metrics import corpus_bleu, exact_match, squad_scores, token_f1


def test_squad_normalisation_and_f1():
    assert exact_match("The Eiffel Tower!", "eiffel   tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # "in the year 1850" vs "1850": 1 common token, precision 1/3 ("in", "year", "1850"), recall 1
    assert token_f1("in the year 1850", "1850") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    scores = squad_scores({0: "Denver Broncos", 1: "wrong"}, {0: ["Broncos", "Denver Broncos"], 1: ["right"], 2: ["x"]})
    assert scores["exact_match"] == pytest.approx(100 / 3) and scores["f1"] == pytest.approx(100 / 3)


def test_classification_scores_equal_torchmetrics():
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (300,), generator=g)
    preds = torch.where(torch.rand(300, generator=g) < 0.6, target, torch.randint(0, 4, (300,), generator=g))
    preds[preds == 3] = 2  # class 3 is never predicted: its F1 is 0 and still counts in the macro mean
    confusion = torch.bincount(target * 4 + preds, minlength=16).view(4, 4).double()
    ours = classification_scores(confusion)
    assert ours["val/accuracy"] == pytest.approx(multiclass_accuracy(preds, target, 4, average="micro").item())
    assert ours["val/macro_f1"] == pytest.approx(multiclass_f1_score(preds, target, 4, average="macro").item())


def test_bleu_is_sacrebleu():
    refs = ["the cat sat on the mat", "a dog barks at night"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert 0 < corpus_bleu(["the cat sat on a mat", "a dog barks at noon"], refs) < 100


def test_best_span_stays_in_context_in_order_and_short():
    start = torch.tensor([9.0, 0.0, -5.0, 5.0, 0.0])
    end = torch.tensor([9.0, 4.0, 6.0, -10.0, 3.0])
    offsets = [None, (0, 3), (4, 7), (8, 11), None]  # positions 0 and 4 are not context
    # 0 -> 0 (18) is outside the context and 3 -> 1 (9) runs backwards: the best is 1 -> 2 (6)
    assert best_span(start, end, offsets, max_answer_tokens=30) == (pytest.approx(6.0), 1, 2)
    assert best_span(start, end, offsets, max_answer_tokens=1) == (pytest.approx(4.0), 1, 1)
    assert best_span(start, end, [None] * 5, max_answer_tokens=30) is None
