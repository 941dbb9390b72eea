"""Hugging Face interop: export a checkpoint as a transformers model directory (checked against
lmtrain's logits) and start a run from a transformers model (init_from=hf:<dir or hub id>).

`convert` maps configs and tensor names (torch only; BERT's configs in `bert`), `files` reads and
writes HF directories, `backbone` imports for training, `export` writes and checks. Only the export's check imports
`transformers` (an optional extra: pip install 'lmtrain[hf]'); training never does.
"""
