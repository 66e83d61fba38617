"""tokenmix.nn window-attention modules and tokenmix.accelerate against timm (random weights,
official key names): same logits and parameter gradients, unchanged state_dict keys."""
import pytest
import torch

import tokenmix
from conftest import DEVICES
from tokenmix.accelerate import _global_queries_per_image
from tokenmix.nn import GlobalWindowAttention, WindowAttention

try:
    import timm
    from timm.models.gcvit import WindowAttentionGlobal
    from timm.models.swin_transformer import SwinTransformerBlock
except Exception as exc:  # not installed, or a torchvision that does not match this torch
    pytest.skip(f"timm unavailable: {exc}", allow_module_level=True)


# Older timm releases paired window w with q_global[w % B] (Tensor.repeat) instead of the image's
# own query; tokenmix implements GC ViT's math and leaves such blocks unaccelerated.
OLD_GCVIT_QUERIES = not _global_queries_per_image(WindowAttentionGlobal(8, 2, (7, 7)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,size", [("swin_tiny_patch4_window7_224", 224),
                                       ("swin_tiny_patch4_window7_224", 256),
                                       ("gcvit_xxtiny", 224), ("gcvit_xxtiny", 256)])
def test_timm_parity(device, name, size):
    torch.manual_seed(0)
    # train mode, no stochastic depth: both runs take the same path
    model = timm.create_model(name, pretrained=False, img_size=size, drop_path_rate=0.0).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    keys = list(model.state_dict().keys())

    ref = model(x)
    ref.square().mean().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    tokenmix.accelerate(model)
    report = model.tokenmix_report
    assert len(report) == 12
    if name.startswith("gcvit") and OLD_GCVIT_QUERIES:
        kept = [r for r in report if not r.replaced]
        assert kept and all("tiles global queries" in r.reason for r in kept) and len(kept) < len(report)
    else:
        assert all(r.replaced for r in report)
    assert list(model.state_dict().keys()) == keys
    out = model(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_accelerate_verbose_report(capsys):
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    tokenmix.accelerate(model, verbose=True)
    out = capsys.readouterr().out
    assert "12 of 12 candidate blocks replaced" in out and "layers.0.blocks.1" in out
    tokenmix.accelerate(model, verbose=True)
    assert "already accelerated" in capsys.readouterr().out
    resnet = timm.create_model("resnet18", pretrained=False)
    tokenmix.accelerate(resnet, verbose=True)
    assert "no supported blocks found" in capsys.readouterr().out


def test_accelerate_keeps_attention_dropout_in_training():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, attn_drop_rate=0.1).train()
    tokenmix.accelerate(model)
    assert not any(r.replaced for r in model.tokenmix_report)
    assert all(r.reason == "attention dropout is not fused" for r in model.tokenmix_report)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,shift", [(14, 14, 3), (13, 17, 0), (13, 17, 3), (5, 6, 0)])
def test_window_attention_module_matches_timm_block_attention(device, H, W, shift):
    """The module = timm's SwinTransformerBlock._attn, loaded from timm's state_dict keys."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=48, input_resolution=(H, W), num_heads=3, window_size=7,
                                 shift_size=shift, always_partition=True, dynamic_mask=True).to(device)
    mod = WindowAttention(48, 3, window_size=7, shift_size=shift).to(device)
    missing, unexpected = mod.load_state_dict(block.attn.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, H, W, 48, device=device)
    torch.testing.assert_close(mod(x), block._attn(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_global", [True, False])
def test_global_window_attention_module_matches_timm(device, use_global):
    if use_global and OLD_GCVIT_QUERIES:
        pytest.skip("this timm tiles global queries across images (Tensor.repeat)")
    torch.manual_seed(0)
    ref = WindowAttentionGlobal(32, 2, (7, 7), use_global=use_global).to(device)
    mod = GlobalWindowAttention(32, 2, 7, use_global=use_global).to(device)
    mod.load_state_dict(ref.state_dict(), strict=True)
    assert set(mod.state_dict()) == {"qkv.weight", "qkv.bias", "rel_pos.relative_position_bias_table",
                                     "proj.weight", "proj.bias"}
    B, H, W = 2, 14, 21
    x = torch.randn(B, H, W, 32, device=device)
    qg = torch.randn(B, 7, 7, 32, device=device)
    xw = x.view(B, H // 7, 7, W // 7, 7, 32).permute(0, 1, 3, 2, 4, 5).reshape(-1, 49, 32)
    expected = ref(xw, qg if use_global else None)
    expected = expected.view(B, H // 7, W // 7, 7, 7, 32).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, 32)
    torch.testing.assert_close(mod(x, qg if use_global else None), expected, rtol=1e-4, atol=1e-5)


class _GlobalQueryStandIn(torch.nn.Module):
    """Stands in for timm's WindowAttentionGlobal: adds to each window ([B * windows, N, C]) the
    global query ([B, wh, ww, C]) of its own image, or, tiled as older timm did, of image w % B."""

    def __init__(self, per_image: bool):
        super().__init__()
        self.window_size = (2, 3)
        self.proj = torch.nn.Linear(4, 4)
        self.per_image = per_image

    def forward(self, x, q_global):
        reps = x.shape[0] // q_global.shape[0]
        if self.per_image:
            q = q_global.repeat_interleave(reps, dim=0)
        else:
            q = q_global.repeat(reps, 1, 1, 1)
        return self.proj(x + q.flatten(1, 2))


def test_global_query_tiling_of_older_timm_is_detected():
    tiled = _GlobalQueryStandIn(per_image=False).train()
    assert not _global_queries_per_image(tiled)
    assert tiled.training  # the probe runs in eval mode and restores the mode
    assert _global_queries_per_image(_GlobalQueryStandIn(per_image=True))
