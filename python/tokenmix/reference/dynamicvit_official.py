"""Eager re-implementation of the official DynamicViT network on DeiT (official code:
``models/dyvit.py``), our own code written from reading it, with its constructor signatures and
state_dict key names: ``Mlp``, ``Attention`` (with ``softmax_with_policy``), ``Block``,
``PatchEmbed``, ``PredictorLG``, ``VisionTransformerDiffPruning``, the helper
``batch_index_select`` and the entry point ``dynamicvit_deit_small``.

Everything runs as the official code runs it: in training the score predictors draw hard
Gumbel-softmax decisions and every block's attention goes through ``softmax_with_policy`` (the
blocks before the first predictor with an all-ones policy); in eval each predictor keeps the
``int(num_patches * token_ratio[i])`` best-scored tokens (``argsort``, then
``batch_index_select``). The training forward returns ``(logits, features, decision,
keep_decisions)`` with ``distill``, ``(logits, keep_decisions)`` without; eval returns the logits.

Departures, none of which changes a result the official code can produce:
- The official forward hard-codes ``14 * 14`` patches, so it runs only at a 14 x 14 patch grid
  (224 x 224 images with 16 x 16 patches); this one takes the number of patches from
  ``patch_embed`` (196 there), so smaller configurations can serve as oracles too.
- ``softmax_with_policy`` casts to fp32 (a stabiliser for half-precision training); an fp64 input
  stays fp64 here, so fp64 tests compare to fp64 rounding.
- No HybridEmbed (no DynamicViT model uses it) and no print per instance.

Nothing in the library imports this module; tests do (the oracle of
``tokenmix.models.dynamicvit``).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.models import init_transformer_weights
from tokenmix.nn.shift import DropPath as _DropPath  # stochastic depth: the same as timm's

__all__ = ["batch_index_select", "Mlp", "Attention", "Block", "PatchEmbed", "PredictorLG",
           "VisionTransformerDiffPruning", "dynamicvit_deit_small"]


def batch_index_select(x, idx):
    """Per-row selection of ``[B, N, C]`` tokens or ``[B, N]`` values by ``idx`` ``[B, K]``:
    flatten the batch, offset the indices by ``b * N``, index."""
    B, N = x.shape[:2]
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    flat = (idx + offset).reshape(-1)
    return x.reshape(B * N, *x.shape[2:])[flat].reshape(B, idx.shape[1], *x.shape[2:])


class Mlp(nn.Module):
    """``drop(fc2(drop(gelu(fc1(x)))))``."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; with a ``policy`` ``[B, N, 1]`` the softmax is
    ``softmax_with_policy``. ``attn_drop`` is built and, as in the official code, never applied."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def softmax_with_policy(self, attn, policy, eps=1e-6):
        """``(a + eps / N) / (sum_j a + eps)`` with ``a = exp(attn - max) * (P_j + (1 - P_j) [i = j])``:
        dropped keys are masked out except for each token's own."""
        B, N, _ = policy.shape
        attn_policy = policy.reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
        attn_policy = attn_policy + (1.0 - attn_policy) * eye
        max_att = torch.max(attn, dim=-1, keepdim=True)[0]
        attn = attn - max_att
        acc = torch.float64 if attn.dtype == torch.float64 else torch.float32
        attn = attn.to(acc).exp_() * attn_policy.to(acc)
        attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
        return attn.type_as(max_att)

    def forward(self, x, policy):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1) if policy is None else self.softmax_with_policy(attn, policy)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x), policy))``, then
    ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, policy=None):
        x = x + self.drop_path(self.attn(self.norm1(x), policy=policy))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv over an image of exactly ``img_size``, flattened to
    ``[B, num_patches, embed_dim]``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size[1] // patch_size[1]) * (img_size[0] // patch_size[0])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        assert (H, W) == self.img_size, f"Input image size ({H}*{W}) doesn't match model {self.img_size}."
        return self.proj(x).flatten(2).transpose(1, 2)


class PredictorLG(nn.Module):
    """Token score predictor: ``in_conv`` (LayerNorm, Linear, GELU) per token; the first half of
    the channels kept per token, the second half replaced by its policy-weighted mean over the
    tokens; ``out_conv`` (MLP C -> C/2 -> C/4 -> 2, GELUs) to log-probabilities
    ``[log p(keep), log p(drop)]``."""

    def __init__(self, embed_dim=384):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x, policy):
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, :C // 2]
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1))


class VisionTransformerDiffPruning(nn.Module):
    """DeiT with DynamicViT's token sparsification: ``patch_embed``, ``cls_token``,
    ``pos_embed``, ``blocks``, ``norm``, ``pre_logits``, ``head``, and one ``score_predictor``
    before each block of ``pruning_loc`` with the cumulative keep ratio ``token_ratio``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, qk_scale=None, representation_size=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_layer=None,
                 pruning_loc=None, token_ratio=None, distill=False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        if representation_size:
            self.num_features = representation_size
            self.pre_logits = nn.Sequential(OrderedDict([
                ('fc', nn.Linear(embed_dim, representation_size)), ('act', nn.Tanh())]))
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in range(len(pruning_loc))])
        self.distill = distill
        self.pruning_loc = pruning_loc
        self.token_ratio = token_ratio
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(init_transformer_weights)  # the official _init_weights

    def forward(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)

        p_count = 0
        out_pred_prob = []
        init_n = self.patch_embed.num_patches
        prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
        policy = torch.ones(B, init_n + 1, 1, dtype=x.dtype, device=x.device)
        for i, blk in enumerate(self.blocks):
            if i in self.pruning_loc:
                spatial_x = x[:, 1:]
                pred_score = self.score_predictor[p_count](spatial_x, prev_decision).reshape(B, -1, 2)
                if self.training:
                    hard_keep_decision = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                    out_pred_prob.append(hard_keep_decision.reshape(B, init_n))
                    cls_policy = torch.ones(B, 1, 1, dtype=hard_keep_decision.dtype, device=hard_keep_decision.device)
                    policy = torch.cat([cls_policy, hard_keep_decision], dim=1)
                    x = blk(x, policy=policy)
                    prev_decision = hard_keep_decision
                else:
                    score = pred_score[:, :, 0]
                    num_keep_node = int(init_n * self.token_ratio[p_count])
                    keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                    cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                    now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
                    x = batch_index_select(x, now_policy)
                    prev_decision = batch_index_select(prev_decision, keep_policy)
                    x = blk(x)
                p_count += 1
            else:
                x = blk(x, policy) if self.training else blk(x)

        x = self.norm(x)
        features = x[:, 1:]
        x = self.head(self.pre_logits(x[:, 0]))
        if self.training:
            if self.distill:
                return x, features, prev_decision.detach(), out_pred_prob
            return x, out_pred_prob
        return x


def dynamicvit_deit_small(**kwargs) -> VisionTransformerDiffPruning:
    """DynamicViT-DeiT-S/0.7 as the official training and evaluation scripts build it (``deit-s``,
    ``base_rate`` 0.7): DeiT-S (patch 16, width 384, depth 12, 6 heads, MLP ratio 4, qkv bias),
    predictors before blocks 3, 6 and 9 keeping 0.7, 0.7**2 and 0.7**3 of the patches, with
    distillation outputs."""
    base_rate = 0.7
    config = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                  pruning_loc=[3, 6, 9], token_ratio=[base_rate, base_rate ** 2, base_rate ** 3], distill=True)
    return VisionTransformerDiffPruning(**{**config, **kwargs})
