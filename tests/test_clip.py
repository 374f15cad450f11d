"""CLIP: the caption tokenizer, the text encoder, the symmetric InfoNCE loss, and a tiny
contrastive run on easy-VQA that learns (loss drops, held-out retrieval beats chance)
and resumes bit-exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from septet.checkpoints.native import load_checkpoint
from septet.errors import CheckpointError, ConfigError, InputError
from septet.models.clip import (
    CLIP,
    CLIPConfig,
    TextConfig,
    TextEncoder,
    caption_tokenizer,
    contrastive_loss,
    encode_texts,
    load_clip,
)
from septet.models.vision import ViTConfig
from septet.tokenizer import Tokenizer
from septet.train.metrics import read_metrics
from septet.vlm.clip_train import CLIPTrainConfig, CLIPTrainer, train_clip


def test_caption_tokenizer_word_level(tmp_path):
    tok = caption_tokenizer(["a teal triangle", "A red circle"])
    assert tok.vocab_size == 4 + 5  # [PAD] [UNK] [SOT] [EOT] + a circle red teal triangle
    ids = encode_texts(tok, ["a Teal triangle", "a purple circle!"], context=7)
    words = [tok.decode([int(i)]) for i in ids[0]]
    assert words == ["[SOT]", "a", "teal", "triangle", "[EOT]", "[PAD]", "[PAD]"]
    assert tok.decode([int(ids[1, 2])]) == "[UNK]"  # unknown word; "!" is its own (unknown) token
    cut = encode_texts(tok, ["a red circle a red circle"], context=4)
    assert cut[0, -1].item() == tok.eot_id  # over-long: cut, [EOT] kept last
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json") == tok


def test_text_encoder_reads_eot_and_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(vocab_size=10, context=8, n_layer=2, d_model=32, n_head=4), eot_id=3)
    a = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]])
    b = torch.tensor([[2, 5, 6, 3, 7, 8, 9, 1]])  # different tokens after [EOT]
    assert torch.allclose(enc(a), enc(b))  # causal: [EOT] never sees what follows it
    assert not torch.allclose(enc(a), enc(torch.tensor([[2, 5, 7, 3, 0, 0, 0, 0]])))
    with pytest.raises(InputError, match="end-of-text"):
        enc(torch.tensor([[2, 5, 6, 0]]))


def test_contrastive_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    logits = torch.randn(5, 5)
    target = torch.arange(5)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert torch.allclose(contrastive_loss(logits), ref)
    assert torch.allclose(contrastive_loss(logits, torch.eye(5, dtype=torch.bool)), ref)
    # duplicate captions: both copies are positives, neither a negative
    labels = torch.tensor([0, 0, 1, 2, 3])
    pos = labels[:, None] == labels[None, :]
    perfect = torch.where(pos, 10.0, -10.0).requires_grad_()
    contrastive_loss(perfect).backward()
    assert perfect.grad[0, 1] > 0.01  # diagonal-only InfoNCE pushes the duplicate pair apart
    perfect.grad = None
    contrastive_loss(perfect, pos).backward()
    assert perfect.grad.abs().max() < 1e-6  # multi-positive targets: already optimal
    # rows 0 and 1 put 1/2 on each of their 2 positives: log 2 each, averaged over 5 rows
    assert torch.allclose(contrastive_loss(perfect, pos), torch.tensor(0.4 * math.log(2)), atol=1e-4)


def test_clip_model_shapes_and_temperature():
    torch.manual_seed(0)
    cfg = CLIPConfig(vision=ViTConfig(image_size=16, patch_size=8, n_layer=1, d_model=16, n_head=2),
                     text=TextConfig(vocab_size=12, context=6, n_layer=1, d_model=16, n_head=2), embed_dim=8)
    model = CLIP(cfg, eot_id=3)
    logits = model(torch.randn(3, 3, 16, 16), torch.tensor([[2, 4, 3, 0, 0, 0]] * 3))
    assert logits.shape == (3, 3)
    assert abs(1 / model.scale().item() - 0.07) < 1e-6
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0  # clipped (CLIP §2.5)


def _tiny(out: Path, **changes) -> CLIPTrainConfig:
    base = dict(out=out, steps=100, batch_size=48, lr=1e-3, warmup=4, weight_decay=0.1, image_size=32,
                patch_size=8, vit_layers=2, vit_dim=64, vit_heads=4, text_layers=1, text_dim=64, text_heads=2,
                embed_dim=64, train_images=480, eval_images=240, eval_every=50, ckpt_every=50, progress=False)
    base.update(changes)
    return CLIPTrainConfig(**base)


def test_tiny_clip_run_learns_and_beats_chance(tmp_path, one_thread):
    summary = train_clip(_tiny(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 101))
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}; held-out i2t {summary['i2t_acc']:.3f} t2i {summary['t2i_r1']:.3f} "
          f"(chance {summary['chance_i2t']:.3f})")
    assert last < first - 1.0  # measured ~3.9 -> ~2.1 over seeds 0-3
    assert summary["i2t_acc"] > 4 * summary["chance_i2t"]  # 24 captions: chance 4.2%; measured 36-40%
    assert "val_i2t_acc" in rows[49] and "temperature" in rows[0]

    model, tok = load_clip(tmp_path / "run")  # the run dir: its newest checkpoint
    assert model.config.vision.image_size == 32
    assert tok.vocab_size == 4 + 8 + 3 + 1  # specials, colours, shapes, "a"
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt.config["family"] == "clip"


def test_clip_resume_is_bit_exact(tmp_path, one_thread):
    tiny = dict(steps=6, batch_size=16, vit_layers=1, vit_dim=16, vit_heads=2, text_dim=16, embed_dim=16,
                train_images=64, eval_images=48, eval_every=3, ckpt_every=3)
    straight = tmp_path / "straight"
    train_clip(_tiny(straight, **tiny))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "step-00000006")  # as if the run died after step 3's checkpoint
    summary = train_clip(_tiny(resumed, resume=True, **tiny))
    assert summary["steps"] == 6
    a = load_checkpoint(straight / "step-00000006").model_state
    b = load_checkpoint(resumed / "step-00000006").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == list(range(1, 7))
    with pytest.raises(ConfigError, match="another model config"):
        train_clip(_tiny(resumed, resume=True, **dict(tiny, vit_dim=32)))


def test_clip_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path, one_thread, monkeypatch):
    """Stopped after step 4 (the newest checkpoint is step 3), resumed to step 6 through
    septet.train.run: the losses equal the uninterrupted run's, none logged twice."""
    tiny = dict(steps=6, batch_size=16, vit_layers=1, vit_dim=16, vit_heads=2, text_dim=16, embed_dim=16,
                train_images=64, eval_images=48, eval_every=3, ckpt_every=3, keep_checkpoints=1)
    train_clip(_tiny(tmp_path / "straight", **tiny))
    original = CLIPTrainer.train_step

    def killed_after_step_4(self):
        if self.loop.step == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(CLIPTrainer, "train_step", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_clip(_tiny(tmp_path / "resumed", **tiny))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("step-*")) == ["step-00000003"]
    summary = train_clip(_tiny(tmp_path / "resumed", resume=True, **tiny))
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("step-00000006")

    def losses(out):
        return {r["step"]: (r["loss"], r["temperature"]) for r in read_metrics(out / "metrics.jsonl")}

    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == losses(tmp_path / "straight")
    assert (tmp_path / "resumed" / "loss.png").is_file()


def test_load_clip_rejects_other_checkpoints(tmp_path):
    from septet.checkpoints.native import save_checkpoint

    save_checkpoint(tmp_path / "lm", model_state={"w": torch.zeros(1)}, config={"family": "llama"},
                    tokenizer_json=None)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        load_clip(tmp_path / "lm")


def test_train_clip_verb(tmp_path, capsys, one_thread):
    from septet.cli import main

    out = tmp_path / "cli-run"
    argv = ["train-clip", "--out", str(out), "--steps", "3", "--warmup", "1", "--batch-size", "8",
            "--train-images", "16", "--eval-images", "16", "--set", "image_size=16", "--set", "vit_layers=1",
            "--set", "vit_dim=32", "--set", "text_dim=32", "--set", "embed_dim=16", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).is_dir()
    assert load_clip(out)[0].config.vision.d_model == 32
    assert main(["train-clip", "--out", str(out), "--set", "depth=3"]) == 2
    assert "FIELD=INT" in capsys.readouterr().err
