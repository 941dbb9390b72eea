"""DeepSpeed ZeRO 1/2/3 (+offload) and FSDP2 on 2 CPU processes over gloo: train, save, resume
after a SIGKILL, export; every strategy follows the same optimization as DDP, and the exported
weights give the logits of the DDP run's model."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli
from lmtrain.checkpoint import resolve_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["trainer.max_steps=6", "trainer.ckpt_every_steps=3", "trainer.val_every_steps=100", "trainer.accelerator=cpu",
          "trainer.devices=2", "trainer.micro_batch_size=2", "model.dropout=0.0"]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("ref")
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, "strategy=ddp", "run_name=ddp"], cwd=cwd)
    run_dir = cwd / "runs" / "ddp"
    state = torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)["state_dict"]
    return {"losses": losses_by_step(run_dir), "state": state, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def logits_of(state: dict, batch: torch.Tensor, tied: bool = True) -> torch.Tensor:
    from lmtrain.inference import model_config_from_record
    from lmtrain.model.transformer import Transformer

    cfg = model_config_from_record({"vocab_size": 262, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
                                    "max_seq_len": 64, "tied_embeddings": tied})
    model = Transformer(cfg)
    plain = {k.removeprefix("model."): v for k, v in state.items()}
    plain.setdefault("lm_head.weight", plain["tok_embeddings.weight"])
    model.load_state_dict(plain)
    with torch.no_grad():
        return model.eval()(batch)


@pytest.mark.parametrize("strategy,kill", [
    ("deepspeed_zero1", False), ("deepspeed_zero2", True), ("deepspeed_zero3", True),
    ("deepspeed_zero3_offload", False), ("fsdp", True)])
def test_train_save_resume_export(prepared, reference, tmp_path, strategy, kill):
    # The inspect views every 3 steps run collectively on every rank; the losses below, equal to the
    # reference run's (which does not inspect), show they leave training untouched.
    inspect = ["logger.inspect_every_steps=3", "logger.inspect_text=The cat sat."]
    # Under the sharding strategies the loss is also chunked (two chunks of a 64-token micro batch): its
    # recomputed lm-head forward runs inside FSDP's and ZeRO-3's parameter gathering, and changes no loss.
    chunked = ["trainer.loss_chunk_tokens=40"] if strategy in ("fsdp", "deepspeed_zero3") else []
    args = ["train", *prepared, *TINY_TRAIN, *COMMON, *inspect, *chunked, f"strategy={strategy}", "run_name=job"]
    run_dir = tmp_path / "runs" / "job"
    if kill:  # ZeRO-1 and ZeRO-3-offload share ZeRO-2/3's checkpoint layouts, which are resumed here
        killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:3"}, check=False)
        assert killed.returncode != 0
        assert (run_dir / "checkpoints" / "step-00000003.ckpt").is_dir()  # a sharded directory
    out = run_cli(args, cwd=tmp_path).stdout
    if kill:
        assert "resuming from" in out and "step-00000003.ckpt" in out
    losses = losses_by_step(run_dir)
    assert [losses[s] for s in range(1, 7)] == pytest.approx([reference["losses"][s] for s in range(1, 7)], rel=1e-5)

    exported = run_cli(["export", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "format=torch",
                        f"out={tmp_path / 'model.pt'}"], cwd=tmp_path)
    assert "exported" in exported.stdout
    state = torch.load(resolve_checkpoint(tmp_path / "model.pt"), weights_only=True)["model"]
    batch = torch.randint(0, 262, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(state, batch), logits_of(reference["state"], batch), rtol=1e-4, atol=1e-4)

    # generate and eval read the sharded checkpoint directly
    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    direct = evaluate(EvalConfig(ckpt=str(run_dir / "checkpoints" / "last.ckpt"), device="cpu"))
    ddp = evaluate(EvalConfig(ckpt=str(reference["ckpt"]), device="cpu"))
    assert direct["val/tokens"] == ddp["val/tokens"] > 0
    assert direct["val/loss"] == pytest.approx(ddp["val/loss"], rel=1e-5)

    if strategy in ("deepspeed_zero1", "deepspeed_zero3_offload"):
        return  # their checkpoint layouts are ZeRO-2's and ZeRO-3's, which inspect and export read below

    # the views written during training, at the last step; a sharded model leaves out the logit lens
    views = run_dir / "inspect" / "step-00000006"
    sharded = strategy.startswith("deepspeed_zero3") or strategy == "fsdp"
    expected = {"attention.png", "attention_mean.png", "surprisal.png", "inspect.json"} | (set() if sharded else {"logit_lens.png"})
    assert {p.name for p in views.iterdir()} == expected
    # lmtrain inspect reads this strategy's checkpoint as it is and sees what the DDP model sees
    from lmtrain.config import InspectConfig
    from lmtrain.inspection import run as inspect_checkpoint

    seen = [inspect_checkpoint(InspectConfig(ckpt=str(ckpt), text="The cat sat.", out=str(tmp_path / name), device="cpu"))
            for name, ckpt in (("direct", run_dir / "checkpoints" / "last.ckpt"), ("ddp", reference["ckpt"]))]
    assert seen[0].surprisal[1:] == pytest.approx(seen[1].surprisal[1:], rel=1e-4)  # [0]: the eos, not scored
    assert torch.allclose(torch.stack(seen[0].attention), torch.stack(seen[1].attention), atol=1e-5)

    # ... and exports as a Hugging Face model that computes in transformers what the DDP run's export does
    # (in this process: the built-in logit check raises if the export's logits are not lmtrain's)
    transformers = pytest.importorskip("transformers")
    from lmtrain.config import ExportConfig, ExportFormat
    from lmtrain.export import run as export

    if "hf" not in reference:
        reference["hf"] = reference["ckpt"].parent.parent / "hf"
        export(ExportConfig(ckpt=str(reference["ckpt"]), format=ExportFormat.hf, out=str(reference["hf"])))
    export(ExportConfig(ckpt=str(run_dir / "checkpoints" / "last.ckpt"), format=ExportFormat.hf, out=str(tmp_path / "hf")))
    hf_logits = []
    for directory in (tmp_path / "hf", reference["hf"]):
        with torch.no_grad():
            hf_logits.append(transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()(batch).logits)
    torch.testing.assert_close(hf_logits[0], hf_logits[1], rtol=1e-4, atol=1e-4)


def test_fsdp_async_save_publishes_whole_checkpoints_and_resumes_after_a_sigkill(prepared, reference, tmp_path):
    """strategy.async_save: the shards are written in a background thread while training goes on; a
    checkpoint is published (renamed, last.ckpt) only once every rank's write is down. A SIGKILL right
    after step 3's is published, then a resume, follows the DDP run's optimization."""
    args = ["train", *prepared, *TINY_TRAIN, *COMMON, "strategy=fsdp", "strategy.async_save=true", "run_name=job"]
    run_dir = tmp_path / "runs" / "job"
    killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:3"}, check=False)
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "step-00000003.ckpt").is_dir()
    out = run_cli(args, cwd=tmp_path).stdout
    assert "resuming from" in out and "step-00000003.ckpt" in out
    losses = losses_by_step(run_dir)
    assert [losses[s] for s in range(1, 7)] == pytest.approx([reference["losses"][s] for s in range(1, 7)], rel=1e-5)
    checkpoints = run_dir / "checkpoints"
    assert resolve_checkpoint(checkpoints / "last.ckpt").name == "step-00000006.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000003.ckpt", "step-00000006.ckpt"]
    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    direct = evaluate(EvalConfig(ckpt=str(checkpoints / "last.ckpt"), device="cpu"))
    ddp = evaluate(EvalConfig(ckpt=str(reference["ckpt"]), device="cpu"))
    assert direct["val/loss"] == pytest.approx(ddp["val/loss"], rel=1e-5)


def test_deepspeed_accumulation_equals_more_ranks(prepared, tmp_path):
    """ZeRO-2 on 1 rank with 2 accumulation steps follows 2 ranks without accumulation: gradients are
    the mean over the global batch, divided by the accumulation once (Lightning) and not again (DeepSpeed's
    engine), so the gradient norms and losses agree."""
    common = ["trainer.max_steps=4", "trainer.val_every_steps=100", "trainer.accelerator=cpu", "trainer.global_batch_size=4",
              "trainer.micro_batch_size=2", "model.dropout=0.0", "trainer.checkpoint=false", "trainer.log_every_steps=1",
              "strategy=deepspeed_zero2"]
    runs = {}
    for name, devices in (("acc", 1), ("ranks", 2)):
        run_cli(["train", *prepared, *TINY_TRAIN, *common, f"trainer.devices={devices}", f"run_name={name}"], cwd=tmp_path)
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(runs["acc"]) == sorted(runs["ranks"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        a, r = runs["acc"][step], runs["ranks"][step]
        assert a["train/loss"] == pytest.approx(r["train/loss"], rel=1e-5), step
        assert a["opt/grad_norm"] == pytest.approx(r["opt/grad_norm"], rel=1e-4), step
