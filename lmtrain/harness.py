"""`lmtrain harness`: a checkpoint scored on lm-evaluation-harness tasks, with no export step.

`LmtrainLM` is a native lm-eval model over lmtrain's own Transformer and tokenizer, so any layout
that `lmtrain eval` reads (a file, a ZeRO or FSDP directory) is evaluated as it is:
- loglikelihood: the context and continuation are encoded together and the continuation's
  tokens scored in one forward, right-padded into batches (a causal model's padding after a
  row's last token changes nothing before it); rows longer than the model's context keep their
  last max_seq_len + 1 tokens, as lm-eval's HF backend does.
- loglikelihood_rolling: lm-eval's disjoint rolling windows over the whole text, each scored
  once, from the eos token (a document boundary, as in training).
- generate_until: greedy decoding with the KV cache (`Transformer.generate`), cut at the first
  stop sequence.

lm-eval is an optional dependency (the `hf` extra); it is imported only here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from lmtrain.checkpoint import resolve_checkpoint
from lmtrain.config import HarnessConfig, HarnessTasks
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.model.transformer import Transformer


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ModuleNotFoundError as e:
        raise ValueError("lmtrain harness needs lm-eval, which training does not: pip install 'lmtrain[hf]' "
                         "(or pip install 'lm_eval>=0.4')") from e
    return TemplateLM


def build_lm(model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 16, max_gen_toks: int = 256):
    """An lm-eval `LM` over a loaded lmtrain model (eval mode) and its tokenizer."""
    TemplateLM = import_lm_eval()

    class LmtrainLM(TemplateLM):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.model, self.lmtrain_tokenizer = model, tokenizer
            self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
            self.max_length = model.cfg.max_seq_len
            self.vocab_size = model.cfg.vocab_size

        @property
        def eot_token_id(self) -> int:
            return self.lmtrain_tokenizer.eos_id

        @property
        def tokenizer_name(self) -> str:
            return "lmtrain"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.lmtrain_tokenizer.encode(string)

        def tok_decode(self, tokens: list[int]) -> str:
            return self.lmtrain_tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            return score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                       self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            results = []
            for (text,) in [request.args for request in requests]:
                windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                results.append(sum(logprob for logprob, _ in score_continuations(self.model, windows, self.batch_size)))
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [self._generate_one(context, dict(gen_kwargs)) for context, gen_kwargs in
                    [request.args for request in requests]]

        def _generate_one(self, context: str, gen_kwargs: dict) -> str:
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-(self.max_length - 1):]  # keep the end of a long context: room for one new token at least
            max_new = min(max_new, self.max_length - len(ids))
            device = next(self.model.parameters()).device
            out = self.model.generate(torch.tensor([ids], device=device), max_new, temperature=0.0,
                                      eos_id=self.eot_token_id)[0, len(ids):].tolist()
            if self.eot_token_id in out:
                out = out[: out.index(self.eot_token_id)]
            text = self.tok_decode(out)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            return text

    return LmtrainLM()


@torch.no_grad()
def score_continuations(model: Transformer, pairs: Iterable[tuple[list[int], list[int]]],
                        batch_size: int) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation
    given the context, and whether greedy decoding would produce it token for token."""
    pairs = list(pairs)
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("lm-eval asked to score an empty continuation")
        whole = (list(context) + list(continuation))[-(limit + 1):]
        rows.append((whole[:-1], len(continuation)))
    results: list[Optional[tuple[float, bool]]] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
    for begin in range(0, len(order), batch_size):
        chunk = order[begin: begin + batch_size]
        width = len(rows[chunk[0]][0])
        inputs = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for row, i in enumerate(chunk):
            inputs[row, : len(rows[i][0])] = torch.tensor(rows[i][0], device=device)
        log_probs = model(inputs)[..., : model.cfg.vocab_size].float().log_softmax(-1)  # (B, T, V)
        for row, i in enumerate(chunk):
            tokens, n_cont = rows[i]
            context, continuation = pairs[i]
            end = len(tokens)
            targets = torch.tensor(list(continuation)[-n_cont:], device=device)
            scored = log_probs[row, end - n_cont: end]  # (n_cont, V): position t predicts token t + 1
            logprob = float(scored.gather(-1, targets[:, None]).sum())
            results[i] = (logprob, bool((scored.argmax(-1) == targets).all()))
    return results  # type: ignore[return-value]


def evaluate(model: Transformer, tokenizer: Tokenizer, cfg: HarnessTasks, *,
             seed: int = 1234) -> Optional[dict[str, Any]]:
    """lm-eval's simple_evaluate on the model; returns its results dict ("results", "configs", ...),
    or None on a process whose LOCAL_RANK is not 0 (lm-eval keeps results on local rank 0)."""
    import lm_eval

    manager = check_tasks(list(cfg.tasks), cfg.include_path)
    lm = build_lm(model, tokenizer, batch_size=cfg.batch_size, max_gen_toks=cfg.max_gen_toks)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    return results  # None where LOCAL_RANK != 0: lm-eval hands results to local rank 0 only


def check_tasks(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager, once every task is known to it; a clear error naming the others."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include_path={include_path} is not a directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in include_path={include_path}" if include_path else "; local tasks need include_path=DIR"
        raise ValueError(f"lm-eval knows no task {unknown} (lm-eval's own tasks{where}); `lm_eval ls tasks` lists them")
    return manager


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's global RNG states as they were before (lm-eval reseeds all three)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """harness/<task>/<metric> -> value, for every numeric metric lm-eval reports (stderr left out)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]  # lm-eval keys are "<metric>,<filter>"
            if "stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                continue
            flat[f"harness/{task}/{metric}"] = float(value)
    return flat


def run(cfg: HarnessConfig) -> dict[str, float]:
    from lm_eval.utils import make_table

    from lmtrain.tasks.config import TaskKind
    from lmtrain.trained import load_trained, read_record

    run_record = read_record(cfg.ckpt)
    if run_record.kind is not TaskKind.causal_lm:
        raise ValueError(f"checkpoint {cfg.ckpt} was trained for task={run_record.kind.name}; lm-eval scores causal "
                         "language models (use lmtrain eval for this task's own metrics)")
    trained = load_trained(cfg.ckpt, cfg.device, run=run_record)
    step = run_record.step
    results = evaluate(trained.model, trained.tokenizer, cfg, seed=cfg.seed)
    if results is None:
        raise RuntimeError(f"lm-eval returned no results (LOCAL_RANK={os.environ.get('LOCAL_RANK')}); run lmtrain "
                           "harness as one process")
    print(make_table(results), flush=True)
    ckpt = resolve_checkpoint(cfg.ckpt).resolve()
    out = Path(cfg.out) if cfg.out else ckpt.parent.parent / "harness" / f"{ckpt.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    flat = scores(results)
    out.write_text(json.dumps({"ckpt": str(ckpt), "step": step, "scores": flat, "results": results["results"],
                               "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {}),
                               "limit": cfg.limit, "num_fewshot": cfg.num_fewshot}, indent=2, default=str) + "\n")
    print(f"wrote {out}", flush=True)
    if cfg.wandb:
        log_to_wandb(ckpt.parent.parent, run_record.raw, flat, step)
    return flat


def log_to_wandb(run_dir: Path, record: dict, flat: dict[str, float], step: int) -> None:
    """The scores into the training run's own W&B run (the id in wandb_state.json), as a summary and
    one row at the checkpoint's step."""
    import wandb

    from lmtrain.loggers import WandbMode, load_wandb_state, wandb_mode

    run_id = load_wandb_state(run_dir).get("run_id")
    if run_id is None:
        raise ValueError(f"wandb=true but run {run_dir} has no W&B run (no {run_dir / 'wandb_state.json'}); "
                         "train with logger.wandb=true, or leave wandb=false")
    logger = record.get("config", {}).get("logger", {})
    mode = wandb_mode(WandbMode(logger.get("mode", "auto")))
    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), mode=mode, project=logger.get("project", "lmtrain"),
                     entity=logger.get("entity"), settings=wandb.Settings(silent=True))
    try:
        run.log({**flat, "harness/checkpoint_step": step})
        run.summary.update(flat)
    finally:
        run.finish()
