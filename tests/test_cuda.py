"""CUDA paths: the same models, training step, decode and FSDP2 on a GPU as on the CPU.

Skipped without a GPU (CI has none); run on one with `pytest -m cuda tests/test_cuda.py`.
Each test compares the GPU against the CPU or against septet's own eager path, so a wrong
kernel choice, a device mismatch or a bad CUDA-graph capture shows up as a difference.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from septet.inference import Sampling, generate_batch_with_logits, generate_ids, optimize_for_inference
from septet.models import build, get_preset
from septet.train.optim import build_optimizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = ["llama-tiny", "gpt3-tiny", "palm-tiny", "lamda-tiny", "gpt4-moe-tiny"]


@pytest.fixture(autouse=True)
def strict_fp32():
    """Plain fp32 matmuls (no TF32), so GPU and CPU agree to fp32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def small(name: str):
    cfg = get_preset(name).config.replace(n_layer=2, context=128)
    torch.manual_seed(0)
    return build(cfg)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_on_gpu_equals_cpu(name):
    model = small(name).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        out = model.cuda()(tokens.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt3-tiny", "palm-tiny"])
def test_training_steps_on_gpu_equal_cpu(name):
    losses = {}
    for device in ("cpu", "cuda"):
        model = small(name).to(device)
        opt = build_optimizer(model, "adamw", 1e-3, 0.1)
        g = torch.Generator().manual_seed(2)
        run = []
        for _ in range(3):
            data = torch.randint(0, model.config.vocab_size, (4, 65), generator=g).to(device)
            loss = model.loss(model(data[:, :-1]), data[:, 1:]).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[device] = run
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)


def test_bf16_autocast_compiled_training_learns():
    model = small("llama-tiny").cuda()
    for block in model.blocks:
        block.compile()
    opt = build_optimizer(model, "adamw", 3e-3, 0.0)
    data = torch.randint(0, model.config.vocab_size, (8, 65), device="cuda")
    first = last = None
    for _ in range(30):  # one batch, repeated: the loss must fall well below its start
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(data[:, :-1])
        loss = model.loss(logits, data[:, 1:]).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.5 * first


@pytest.mark.parametrize("graphs", ["1", "0"])
def test_compiled_decode_on_gpu_equals_eager(graphs, monkeypatch):
    """The static compiled step (and its CUDA-graph replay) gives the eager step's tokens
    and logits, for one prompt and for a left-padded batch, across two calls (new caches)."""
    monkeypatch.setenv("SEPTET_CUDA_GRAPHS", graphs)
    model = optimize_for_inference(small("llama-tiny").cuda())
    if "_static_decoder" in model.__dict__:
        del model.__dict__["_static_decoder"]
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8], [11, 12, 13, 14, 15, 16, 17, 18]]
    eager = Sampling(max_new_tokens=20, temperature=0.0, compile=False)
    compiled = Sampling(max_new_tokens=20, temperature=0.0, compile=True)
    for _ in range(2):
        ids_e, logits_e = generate_batch_with_logits(model, prompts, eager)
        ids_c, logits_c = generate_batch_with_logits(model, prompts, compiled)
        assert ids_c == ids_e
        for a, b in zip(logits_c, logits_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    one = list(generate_ids(model, prompts[0], compiled))
    assert one == ids_e[0]


def test_fsdp2_over_nccl_matches_the_plain_model():
    """FSDP2 on a one-rank NCCL mesh runs the sharded code path (DTensor parameters,
    all-gather per block, clipped global norm) and must give the unsharded losses."""
    import torch.distributed as dist

    from septet.train import parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        d = parallel.Dist(0, 1, 0, torch.device("cuda:0"))
        runs = {}
        for sharded in (False, True):
            model = small("llama-tiny").cuda()
            if sharded:
                parallel.apply_fsdp(model, d)
            opt = build_optimizer(model, "adamw", 1e-3, 0.1)
            g = torch.Generator().manual_seed(3)
            out = []
            for _ in range(3):
                data = torch.randint(0, model.config.vocab_size, (4, 65), generator=g).cuda()
                loss = model.loss(model(data[:, :-1]), data[:, 1:]).total
                loss.backward()
                norm = parallel.grad_norm_clip(model, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                out.append((loss.item(), norm))
            runs[sharded] = out
        for (la, na), (lb, nb) in zip(runs[False], runs[True]):
            assert lb == pytest.approx(la, rel=1e-5)
            assert nb == pytest.approx(na, rel=1e-4)
    finally:
        dist.destroy_process_group()


def test_vision_language_bridges_on_gpu_equal_cpu():
    from septet.models.blip2 import Blip2, Blip2Config
    from septet.models.flamingo import Flamingo, FlamingoConfig
    from septet.nn.qformer import QFormerConfig

    def lm():
        torch.manual_seed(0)
        return build(get_preset("llama-tiny").config.replace(n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                                             vocab_size=128, context=64))

    torch.manual_seed(1)
    flamingo = Flamingo(lm(), FlamingoConfig(d_visual=16, n_latents=4, resampler_layers=1, resampler_dim=32,
                                             resampler_heads=2, resampler_head_dim=16, xattn_every=1,
                                             xattn_heads=4, xattn_head_dim=16)).eval()
    with torch.no_grad():
        for layer in flamingo.xattn:  # open the gates so the bridge changes the logits
            layer.attn_gate.fill_(0.7)
            layer.ffw_gate.fill_(0.5)
    tokens = torch.randint(0, 128, (2, 12))
    tokens[:, 2] = flamingo.image_token_id
    media = torch.randn(2, 1, 1, 5, 16)
    with torch.no_grad():
        ref = flamingo(tokens, media)
        out = flamingo.cuda()(tokens.cuda(), media.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    torch.manual_seed(2)
    qcfg = QFormerConfig(d_model=32, n_layer=2, n_head=4, d_ff=64, n_query=3, d_visual=16, vocab_size=50,
                         max_text=16)
    blip = Blip2(lm(), Blip2Config(qformer=qcfg)).eval()
    feats = torch.randn(2, 5, 16)
    text = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = blip(feats, text)
        out = blip.cuda()(feats.cuda(), text.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
