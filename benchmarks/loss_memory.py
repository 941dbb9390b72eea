"""Peak host memory of one training step's loss (forward + backward of the lm head and cross entropy)
with the whole fp32 logits against `trainer.loss_chunk_tokens` chunks, side by side.

Each variant runs in a fresh process of its own (peak RSS cannot be reset inside one), on the same
hidden states, targets and head weights; the ratio of the peaks (above the process's baseline after
the inputs exist) is printed in one line with both absolute figures and the loss difference:

    python benchmarks/loss_memory.py                                 # GPT-2's vocab, 8 x 1024 tokens
    python benchmarks/loss_memory.py --vocab 128256 --tokens 4096    # Llama 3's
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def one_variant(vocab: int, d_model: int, tokens: int, chunk: int) -> dict:
    """Forward + backward of the loss, in this process; returns the peak RSS above the inputs' baseline."""
    from lmtrain.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=1, n_heads=max(1, d_model // 64),
                                    d_ff=4 * d_model, max_seq_len=8, tied_embeddings=False))
    hidden = torch.randn(1, tokens, d_model, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    baseline = peak_rss_mb()
    if chunk:
        loss = model.chunked_loss_sum(hidden, targets, chunk)
    else:
        loss = F.cross_entropy(model.compute_logits(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    loss.backward()
    return {"peak_mb": peak_rss_mb() - baseline, "loss": loss.item(), "grad_sum": float(hidden.grad.double().sum())}


def run_child(args, chunk: int) -> dict:
    command = [sys.executable, __file__, "--child", "--vocab", str(args.vocab), "--d-model", str(args.d_model),
               "--tokens", str(args.tokens), "--chunk", str(chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=8 * 1024, help="batch x seq_len of one micro batch")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(one_variant(args.vocab, args.d_model, args.tokens, args.chunk)))
        return
    plain, chunked = run_child(args, 0), run_child(args, args.chunk)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"loss memory, vocab {args.vocab}, {args.tokens} tokens, d_model {args.d_model} (fp32 logits {logits_mb:.0f} MiB):")
    print(f"  plain {plain['peak_mb']:.0f} MB | chunked ({args.chunk} tokens) {chunked['peak_mb']:.0f} MB | "
          f"ratio chunked/plain {chunked['peak_mb'] / max(plain['peak_mb'], 1e-9):.3f} | "
          f"loss diff {abs(chunked['loss'] - plain['loss']) / abs(plain['loss']):.1e} (relative) | "
          f"grad diff {abs(chunked['grad_sum'] - plain['grad_sum']):.1e}", flush=True)


if __name__ == "__main__":
    main()
