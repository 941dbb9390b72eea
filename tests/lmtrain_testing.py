"""Helpers shared by the tests: a small real corpus, real `lmtrain` runs in-process or as processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests that start processes give each one thread: two busy processes on 2 cores run 18-25x slower.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
             "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "our teacher", "a small child", "the king"]
VERBS = ["sees", "likes", "finds", "follows", "calls", "helps", "watches", "remembers"]
OBJECTS = ["the river", "a red ball", "the tall tree", "his friend", "the green door", "an apple", "the moon", "the road"]


def write_corpus(directory: Path, n_paragraphs: int = 60, seed: int = 0) -> Path:
    """Paragraphs of grammatical sentences from a small vocabulary: learnable, real text."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(3, 6))]
        paragraphs.append(" ".join(s.capitalize() for s in sentences))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def data_overrides(corpus: Path, cache: Path, *, val_fraction: float = 0.1) -> list[str]:
    return [
        "data=text_files", f"data.paths=[{corpus}]", "data.text_unit=paragraph", f"data.cache_dir={cache}",
        f"data.val_fraction={val_fraction}", "data.num_proc=1", "tokenizer=byte",
    ]


# A model and trainer small enough for a step in a few milliseconds on one thread.
TINY_TRAIN = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
    "trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.val_batches=2", "trainer.log_every_steps=1",
    "trainer.progress_bar=false", "schedule.warmup_steps=2", "optim.lr=3e-3", "trainer.sample_tokens=16",
]


def compose(config_name: str, overrides: list[str]):
    """The real conf/ composed through Hydra, as the CLI does it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lmtrain.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


# A process or a job is judged hung only when it shows no progress (no output, no change under the
# paths it writes, no change of SLURM state) for this long. Nothing here assumes how long N steps take:
# a slow or busy machine gets the time it needs, and a hang still ends the test.
STALL_S = float(os.environ.get("LMTRAIN_TEST_STALL_S", "600"))


def tree_signature(paths) -> tuple:
    """(path, size, mtime) of every file under `paths`: changes whenever anything is written there."""
    sig = []
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for f in files:
            try:
                st = f.stat()
            except OSError:  # removed between the listing and the stat
                continue
            sig.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def wait_for(condition, *, what: str, progress=lambda: None, stall_s: float = STALL_S, poll_s: float = 0.2):
    """Poll until condition() is truthy and return it; fail only when progress() stays the same
    for stall_s seconds (the thing waited on is stuck, however fast or slow the machine is)."""
    last, since = progress(), time.monotonic()
    while True:
        result = condition()
        if result:
            return result
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"gave up waiting for {what}: no progress for {stall_s:.0f} s")
        time.sleep(poll_s)


def start_cli(args: list[str], *, cwd: Path, env: dict | None = None, merge_stderr: bool = False,
              log: Path | None = None) -> subprocess.Popen:
    """`python -m lmtrain ...` as a user starts it, in its own process group (so that all its
    ranks can be killed together). With `log`, stdout and stderr go to that file (to wait for a
    line while the process runs); otherwise to pipes."""
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child holds it; closed when it exits
    return subprocess.Popen([sys.executable, "-m", "lmtrain", *args], cwd=cwd, env={**os.environ, **CHILD_ENV, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT if merge_stderr or log else subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and, when it leads its own process group (start_cli), all its ranks."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


def communicate(proc: subprocess.Popen, *, what: str, watch=(), stall_s: float = STALL_S) -> tuple[str, str]:
    """Read the process's output until it exits; kill its process group and fail if it makes no
    progress (output, or a change under `watch`) for stall_s."""
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def drain(name: str) -> None:
        for line in iter(getattr(proc, name).readline, ""):
            chunks[name].append(line)

    readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in chunks if getattr(proc, n) is not None]
    for t in readers:
        t.start()
    try:
        wait_for(lambda: proc.poll() is not None, what=f"{what} to exit", stall_s=stall_s,
                 progress=lambda: (sum(map(len, chunks.values())), tree_signature(watch)))
    except AssertionError as e:
        kill_tree(proc)
        proc.wait()
        for t in readers:
            t.join(timeout=10)
        raise AssertionError(f"{e}; killed it\n--- output\n{''.join(chunks['stdout'])[-3000:]}"
                             f"\n{''.join(chunks['stderr'])[-3000:]}") from None
    for t in readers:
        t.join()
    return "".join(chunks["stdout"]), "".join(chunks["stderr"])


def run_cli(args: list[str], *, cwd: Path, env: dict | None = None, check: bool = True, watch=(),
            stall_s: float = STALL_S) -> subprocess.CompletedProcess:
    """`python -m lmtrain ...` as a user runs it; returns the CompletedProcess (output captured).
    It may take as long as it needs while it makes progress (see STALL_S); `watch` names paths
    whose changes count as progress for commands that write there rather than print (sweeps)."""
    proc = start_cli(args, cwd=cwd, env=env)
    out, err = communicate(proc, what=f"lmtrain {' '.join(args[:1])}", watch=watch, stall_s=stall_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmtrain {' '.join(args)} exited {proc.returncode}\n--- stdout\n{out[-4000:]}"
                             f"\n--- stderr\n{err[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_in_process(overrides: list[str], run_dir: Path):
    """`lmtrain train` without a new interpreter (saves ~10 s of imports per run)."""
    from lmtrain.config import to_record, to_typed
    from lmtrain.train import run

    cfg = compose("train", [*overrides, f"runs_dir={run_dir.parent}", f"run_name={run_dir.name}"])
    run(to_typed(cfg), to_record(cfg), run_dir)
    return run_dir


def losses_by_step(run_dir: Path) -> dict[int, float]:
    from lmtrain.loggers import read_metrics

    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in row}


# -- labelled examples for the fine-tuning tasks (learnable, generated here) -------------------------
POSITIVE_VERBS = {"likes", "helps", "finds", "remembers"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_classification_data(directory: Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Sentences of the corpus vocabulary; the label says whether the verb is a 'positive' one
    (a word-level fact a byte-level model has to learn to read)."""
    rng = random.Random(seed)

    def row() -> dict:
        verb = rng.choice(VERBS)
        text = f"{rng.choice(SUBJECTS)} {verb} {rng.choice(OBJECTS)}.".capitalize()
        return {"sentence": text, "label": int(verb in POSITIVE_VERBS)}

    return (_write_jsonl(directory / "train.jsonl", [row() for _ in range(n_train)]),
            _write_jsonl(directory / "val.jsonl", [row() for _ in range(n_val)]))


NAMES = ["anna", "bert", "carl", "dora", "emil", "fred", "gina", "hugo", "ines", "jack"]
THINGS = ["apple", "book", "coin", "drum", "egg", "flute", "glove", "hat", "kite", "lamp"]
RELATIONS = [("has", "what does {} have?"), ("sees", "what does {} see?"), ("wants", "what does {} want?")]


def write_qa_data(directory: Path, n_train: int = 4000, n_val: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """SQuAD-format examples: a context of three facts, each with another verb, in random order;
    the question asks for the object of one of them."""
    rng = random.Random(seed)

    def row(i: int) -> dict:
        names, things = rng.sample(NAMES, 3), rng.sample(THINGS, 3)
        relations = rng.sample(RELATIONS, 3)
        context = " ".join(f"{n} {verb} a {t}." for n, (verb, _), t in zip(names, relations, things))
        k = rng.randrange(3)
        start = context.index(f"{names[k]} {relations[k][0]} a ") + len(f"{names[k]} {relations[k][0]} a ")
        return {"id": f"q{i}", "question": relations[k][1].format(names[k]), "context": context,
                "answers": {"text": [things[k]], "answer_start": [start]}}

    return (_write_jsonl(directory / "train.jsonl", [row(i) for i in range(n_train)]),
            _write_jsonl(directory / "val.jsonl", [row(n_train + i) for i in range(n_val)]))


def write_translation_data(directory: Path, n_train: int = 800, n_val: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A toy language pair: words are letters, translated one by one through a fixed substitution
    and written in reverse order (so the model has to attend, not copy position by position)."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    substitution = dict(zip(letters, "qrstuvwxyz"))

    def row() -> dict:
        words = [rng.choice(letters) for _ in range(rng.randint(3, 6))]
        return {"source": " ".join(words), "target": " ".join(substitution[w] for w in reversed(words))}

    return (_write_jsonl(directory / "train.jsonl", [row() for _ in range(n_train)]),
            _write_jsonl(directory / "val.jsonl", [row() for _ in range(n_val)]))


POSITIVE_WORDS = ["happy", "glad", "bright", "kind", "warm", "calm", "proud", "brave"]
NEGATIVE_WORDS = ["sad", "angry", "dark", "cruel", "cold", "tense", "ashamed", "afraid"]
MOOD_TEMPLATES = ["{} is {}.", "{} feels {} today.", "{} looks {}.", "{} was {} again."]


def _mood_sentence(rng: random.Random, word: str) -> str:
    return rng.choice(MOOD_TEMPLATES).format(rng.choice(SUBJECTS), word).capitalize()


def write_mood_corpus(directory: Path, n_paragraphs: int = 400, seed: int = 0) -> Path:
    """Unlabelled paragraphs that each keep one mood: their mood words co-occur, so pretraining
    can learn which words go together (and nothing else says which mood a word has)."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        words = POSITIVE_WORDS if rng.random() < 0.5 else NEGATIVE_WORDS
        paragraphs.append(" ".join(_mood_sentence(rng, rng.choice(words)) for _ in range(rng.randint(4, 7))))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def write_mood_classification_data(directory: Path, n_train: int = 64, n_val: int = 100, seed: int = 0,
                                   held_out_words: bool = False) -> tuple[Path, Path]:
    """Sentences labelled by the mood of their one mood word. With held_out_words the train split
    uses half of each mood's words and the val split the other half: only a backbone that learned
    from the corpus which words go together can classify the val sentences."""
    rng = random.Random(seed)
    val_words = (POSITIVE_WORDS[4:], NEGATIVE_WORDS[4:]) if held_out_words else (POSITIVE_WORDS[:4], NEGATIVE_WORDS[:4])

    def row(positive: list[str], negative: list[str]) -> dict:
        label = rng.random() < 0.5
        return {"sentence": _mood_sentence(rng, rng.choice(positive if label else negative)), "label": int(label)}

    return (_write_jsonl(directory / "train.jsonl", [row(POSITIVE_WORDS[:4], NEGATIVE_WORDS[:4]) for _ in range(n_train)]),
            _write_jsonl(directory / "val.jsonl", [row(*val_words) for _ in range(n_val)]))


def example_overrides(train: Path, val: Path) -> list[str]:
    return ["data=task_files", f"data.paths=[{train}]", f"data.val_paths=[{val}]", "tokenizer=byte"]


def cli_in_process(args: list[str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`lmtrain ...` through the real CLI entry point, inside this process: no interpreter start-up
    (~10 s of imports), for commands that fail fast or do little work. Environment and argv changes
    the CLI makes are undone after the test."""
    from lmtrain.cli import main

    monkeypatch.setenv("LMTRAIN_COMMAND", "")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["lmtrain"])
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["lmtrain", *args], code, out, err)


def refusal_line(proc: subprocess.CompletedProcess) -> str:
    """A refused input: exit 2 and exactly one `lmtrain: error:` line, no traceback (a data load's
    progress bars may come before it); returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lmtrain: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def write_bert_tokenizer(directory: Path, vocab_size: int = 200) -> Path:
    """A BERT WordPiece tokenizer (uncased; [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, as BERT's
    own trainer orders them) trained on the test corpus's words, saved as tokenizer.json plus the
    tokenizer_config.json transformers writes for it: what a BERT directory on the hub holds."""
    import json

    from tokenizers import processors
    from tokenizers.implementations import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    texts = [" ".join(words) + " . , ? !" for words in (SUBJECTS, VERBS, OBJECTS, POSITIVE_WORDS, NEGATIVE_WORDS)]
    tokenizer.train_from_iterator(texts * 20, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    # BERT's template, which its tokenizer.json files on the hub carry (the trainer leaves none)
    cls_sep = [(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")]
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                             special_tokens=cls_sep)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
              "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]", "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory / "tokenizer.json"


# -- sharded prepare (datatrove tasks): jsonl inputs and the prepared dataset they give -------------


def write_jsonl_corpus(directory: Path, n_files: int = 5, docs_per_file: int = 150, seed: int = 0) -> Path:
    """Files of sentence documents; every 13th row is empty, every 17th whitespace only (both dropped)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        rows = []
        for d in range(docs_per_file):
            sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(1, 6))]
            text = "" if d % 13 == 5 else " \n " if d % 17 == 3 else " ".join(sentences)
            rows.append(json.dumps({"text": text, "n": d}) + "\n")
        (directory / f"part-{f:02d}.jsonl").write_text("".join(rows))
    return directory


def sharded_overrides(corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["data=jsonl_files", f"data.paths=[{corpus}/*.jsonl]", f"data.cache_dir={cache}", "data.val_fraction=0.1",
            "tokenizer=bpe", "tokenizer.vocab_size=300", *extra]


def prepare_sharded_in_process(args: list[str]) -> Path:
    from lmtrain.config import to_typed
    from lmtrain.data.sharded_prepare import prepare_sharded

    typed = to_typed(compose("prepare", args))
    return prepare_sharded(typed.data, typed.tokenizer, typed.prepare, log=lambda _: None)


def tokens_of(directory: Path) -> tuple:
    """(train tokens, val tokens) of a prepared dataset, as arrays."""
    from lmtrain.data.prepare import load_prepared

    data = load_prepared(directory)
    return data.train[:], data.val[:]


def meta_without_time(directory: Path) -> dict:
    meta = json.loads((directory / "meta.json").read_text())
    meta.pop("created")
    return meta
