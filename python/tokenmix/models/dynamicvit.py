"""DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification", NeurIPS 2021) on DeiT-S as in the official code (``models/dyvit.py``,
``VisionTransformerDiffPruning``): same architecture, configuration, initialisation and
state_dict keys, its sparse-token steps running on tokenmix's gather family
(:func:`tokenmix.ops.policy_softmax`, :func:`tokenmix.ops.topk_tokens`).

The network is DeiT: a ``patch_size`` conv patch embedding, a class token and a learned position
embedding (``pos_embed``, sized for ``img_size`` at construction), ``depth`` pre-norm transformer
blocks (:class:`Block`), ``norm``, the class token through ``pre_logits`` and ``head``. Before block
``pruning_loc[s]`` a :class:`PredictorLG` scores the ``n`` patch tokens (the class token is never
scored): with ``z = GELU(Linear(LayerNorm(x)))`` split in halves ``[z_l, z_g]`` and the current
decisions ``D`` (``[B, n, 1]``, 1 = kept),

    g = sum_j D_j z_g[j] / sum_j D_j,    s = log_softmax(MLP([z_l, g]))    (columns: keep, drop)

- training: ``D <- hard_gumbel_softmax(s)[..., keep] * D`` (straight-through: the forward value is
  0/1, the gradient is the soft sample's); no token is removed, instead every block's attention
  masks the dropped keys with ``policy = [1, D]`` (``[B, 1 + n]``):
  ``a_ij = exp(l_ij - max_j l_ij) * (P_j + (1 - P_j) [i = j])``,
  ``attn_ij = (a_ij + eps / N) / (sum_j a_ij + eps)``, ``eps = 1e-6``. The blocks before the first
  predictor use this softmax too, with an all-ones policy (as the official code does).
- eval: the ``int(n * token_ratio[s])`` tokens of highest keep score are gathered (class token
  first, then descending score) and the rest dropped; attention is a plain softmax. The count is
  the official one, float rounding included: DeiT-S's ratios are ``0.7 ** k`` and
  ``0.7 ** 2 == 0.48999...``, so 196 patches keep 137, 96, 67 but 100 patches keep 70, 48, 34.

Input size: as in the official code, the model takes images of exactly ``img_size`` (the
position embedding has one row per patch and is not interpolated in the forward; the official
code resizes it only when loading a checkpoint into a model built for another size). The official
forward also hard-codes 14 x 14 patches; here the patch count follows ``img_size``, so
``img_size=160`` gives 10 x 10 patches. The smallest input is one that leaves a token after
the last predictor: with 16 x 16 patches, 32 x 32 (4 patches, keeping 2, 1, 1).

``fused=True`` runs the training softmax as :func:`tokenmix.ops.policy_softmax`, the eval pruning
as :func:`tokenmix.ops.topk_tokens` and the eval attention as
``torch.nn.functional.scaled_dot_product_attention``; ``fused=False`` runs the official eager
code (``softmax_with_policy``, ``argsort`` + ``batch_index_select``, explicit softmax). Both draw
their Gumbel noise with the same ``F.gumbel_softmax`` calls in the same order, so under the same
random state they take the same decisions. Ties in the eval top-k: ``topk_tokens`` puts the lower
position first, and the eager path sorts stably, so both keep the same tokens; the official
``argsort`` is not stable, which leaves ties in an unspecified order (exact ties do not occur
with real-valued scores in practice). The eager masked softmax computes in fp32 for fp32 and
narrower inputs (the official stabiliser) and in fp64 for fp64, as ``policy_softmax`` does.

What the official training forward returns for DynamicViT's losses (the ratio loss on the
decisions, the token distillation on the features): ``model(x, return_aux=True)`` returns it,
in training ``(logits, features [B, n, C], decision [B, n, 1] (detached), keep_decisions)`` with
``distill`` (the DeiT-S configuration), ``(logits, keep_decisions)`` without, where
``keep_decisions`` is the list of the ``[B, n]`` decisions of each predictor; in eval the logits,
like the official forward. ``model(x)`` returns the logits in both modes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.models import Backbone, Mlp, build, default_cfg, init_transformer_weights, register
from tokenmix.nn.shift import DropPath
from tokenmix.ops.gather import policy_softmax, topk_tokens

__all__ = ["Mlp", "Attention", "Block", "PatchEmbed", "PredictorLG", "DynamicViT", "dynamicvit_deit_small",
           "softmax_with_policy", "batch_index_select"]

# Read by timm's register_model.
default_cfgs = {"dynamicvit_deit_small": default_cfg("dynamic-vit_384_r0.7.pth", "patch_embed.proj", crop_pct=0.9)}


def softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """The official masked softmax, eagerly: ``attn`` ``[B, h, N, N]``, ``policy`` ``[B, N, 1]``
    (see the module docstring for the formula). Computed in fp32 for fp32 and narrower inputs (the
    official stabiliser) and in fp64 for fp64, returned in ``attn``'s dtype."""
    B, N = policy.shape[:2]
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    acc = torch.float64 if attn.dtype == torch.float64 else torch.float32
    attn = (attn - max_att).to(acc).exp_() * attn_policy.to(acc)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """The official per-row selection, eagerly: ``out[b, k] = x[b, idx[b, k]]`` for ``[B, N, C]``
    tokens or ``[B, N, 1]`` decisions, by flattening the batch and offsetting the indices."""
    B, N = x.shape[:2]
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    flat = (idx + offset).reshape(-1)
    return x.reshape(B * N, *x.shape[2:])[flat].reshape(B, idx.shape[1], *x.shape[2:])


class Attention(nn.Module):
    """Multi-head self-attention with DynamicViT's optional policy (keys ``qkv``, ``proj``):
    ``proj(softmax(scale q k^T) v)``, the softmax masked by ``policy`` ``[B, N, 1]`` when one is
    given (training), plain otherwise.

    Args:
        dim: channels; ``num_heads`` heads of ``dim // num_heads``.
        qkv_bias: bias of ``qkv``.
        qk_scale: overrides ``head_dim ** -0.5``.
        proj_drop: dropout after ``proj``. (The official module also builds an attention dropout
            that its forward never applies; there is none here.)
        fused: keyword-only; ``False`` runs the official eager softmaxes. An attribute, so it can
            be flipped on a built module.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 proj_drop: float = 0., *, fused: bool = True):
        super().__init__()
        self.num_heads, self.fused = num_heads, fused
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, policy: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused and policy is None:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if policy is None:
                attn = attn.softmax(dim=-1)
            elif self.fused:
                attn = policy_softmax(attn, policy.reshape(B, N))
            else:
                attn = softmax_with_policy(attn, policy)
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """DeiT's pre-norm block (the official keys): ``x + drop_path(attn(norm1(x), policy))``, then
    ``x + drop_path(mlp(norm2(x)))``; LayerNorms with eps 1e-6, GELU MLP of ``mlp_ratio * dim``.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias, qk_scale: the attention and MLP configuration.
        drop: dropout after the attention projection and in the MLP.
        drop_path: stochastic depth rate.
        fused: keyword-only; passed to :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0., drop_path: float = 0., *, fused: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=drop,
                              fused=fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, policy: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), policy))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (key ``proj``): a ``patch_size`` conv with stride
    ``patch_size``, flattened to ``[B, num_patches, embed_dim]``. As the official module, it takes
    images of exactly ``img_size`` (the position embedding is sized for them)."""

    def __init__(self, img_size: int | Tuple[int, int] = 224, patch_size: int | Tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.num_patches = (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"PatchEmbed: input size {tuple(x.shape[-2:])} must be the model's img_size "
                             f"{self.img_size} (build the model with img_size=...)")
        return self.proj(x).flatten(2).transpose(1, 2)


class PredictorLG(nn.Module):
    """DynamicViT's local-global score predictor (the official keys): ``in_conv`` (LayerNorm with
    the default eps 1e-5, Linear C -> C, GELU) per token; the first C/2 channels kept per token,
    the last C/2 replaced by their ``policy``-weighted mean over the tokens; ``out_conv`` (Linear
    C -> C/2, GELU, Linear C/2 -> C/4, GELU, Linear C/4 -> 2, log-softmax). Input ``[B, n, C]``
    and ``policy`` ``[B, n, 1]``; output ``[B, n, 2]``, the log-probabilities of keeping and of
    dropping each token."""

    def __init__(self, embed_dim: int = 384):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        B, N, C = x.shape
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([x[:, :, :C // 2], global_x.expand(B, N, C // 2)], dim=-1))


class DynamicViT(Backbone):
    """The DynamicViT network on DeiT (the official ``VisionTransformerDiffPruning`` signature,
    less ``hybrid_backbone`` and ``norm_layer``: LayerNorms with eps 1e-6, as the official
    default). ``pruning_loc`` and ``token_ratio`` default to DeiT-S's schedule (the official
    constructor requires them). Differences that change no result and no key: the number of
    patch tokens comes from ``img_size`` and ``patch_size`` (the official forward hard-codes
    14 x 14, so it runs only at 224 x 224 with 16 x 16 patches), ``num_classes=0`` gives an
    ``nn.Identity`` head, and the timm model interface is added: ``forward_features`` returns
    the normalised tokens (``[B, 1 + n, C]`` in training, where dropped tokens stay in place
    masked by the policy; ``[B, 1 + int(n * token_ratio[-1]), C]`` in eval), ``forward_head``
    takes the class token through ``pre_logits`` and ``head``; ``get_classifier``,
    ``reset_classifier``, ``num_features``, ``set_grad_checkpointing``. ``forward(x,
    return_aux=True)`` returns what the official forward returns (see the module docstring).

    Args beyond the official ones:
        fused: keyword-only; ``False`` runs the official eager softmaxes and pruning. A property:
            setting it on a built model switches every block's attention too.
    """

    def __init__(self, img_size: int | Tuple[int, int] = 224, patch_size: int | Tuple[int, int] = 16,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 representation_size: Optional[int] = None, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., pruning_loc: Sequence[int] = (3, 6, 9),
                 token_ratio: Sequence[float] = (0.7, 0.7 ** 2, 0.7 ** 3), distill: bool = False, *,
                 fused: bool = True):
        super().__init__()
        pruning_loc, token_ratio = [int(i) for i in pruning_loc], [float(r) for r in token_ratio]
        if len(pruning_loc) != len(token_ratio):
            raise ValueError(f"DynamicViT: pruning_loc ({pruning_loc}) and token_ratio ({token_ratio}) "
                             "need one entry per predictor")
        if any(b <= a for a, b in zip(pruning_loc, pruning_loc[1:])) or \
                any(not 0 <= i < depth for i in pruning_loc):
            raise ValueError(f"DynamicViT: pruning_loc must increase within [0, depth={depth}), got {pruning_loc}")
        if any(not 0. < r <= 1. for r in token_ratio):
            raise ValueError(f"DynamicViT: token_ratio entries must lie in (0, 1], got {token_ratio}")
        # attn_drop_rate is accepted for the official signature and unused: the official
        # attention builds its dropout and never applies it.
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                  drop_path=rates[i], fused=fused) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if representation_size:
            self.num_features = representation_size
            self.pre_logits = nn.Sequential(OrderedDict(
                [("fc", nn.Linear(embed_dim, representation_size)), ("act", nn.Tanh())]))
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in pruning_loc])
        self.distill = distill
        self.pruning_loc, self.token_ratio = pruning_loc, token_ratio
        # Tokens kept after each predictor in eval, a Python int per predictor (as the official
        # forward computes it): the pruned shapes are static, so torch.compile traces them.
        self.num_keep = [int(n * r) for r in token_ratio]
        bounds = [0, *pruning_loc, depth]
        self._segments = list(zip(bounds[:-1], bounds[1:]))
        self._fused = fused
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        # The official initialisation; the patch embedding keeps PyTorch's conv initialisation.
        self.apply(init_transformer_weights)

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = value
        for blk in self.blocks:
            blk.attn.fused = value

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official exemption from weight decay (read by timm's optimizer factory)."""
        return {"pos_embed", "cls_token"}

    def _prune(self, x: Tensor, score: Tensor, decision: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Eval pruning: keep the class token and the ``k`` best-scored patch tokens of ``x``
        (``score`` ``[B, n]``), with the matching rows of ``decision`` (all ones in eval)."""
        B = x.shape[0]
        if self._fused:
            x, _ = topk_tokens(x, score, k, keep_first=1)
            return x, decision.new_ones(B, k, 1)
        keep = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
        index = torch.cat([keep.new_zeros(B, 1), keep + 1], dim=1)
        return batch_index_select(x, index), batch_index_select(decision, keep)

    def _forward_tokens(self, x: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """The official forward up to the final norm: ``(normalised tokens, final decisions
        [B, n, 1] (kept tokens only in eval), the training decisions of each predictor)``."""
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        n = self.patch_embed.num_patches
        decision = torch.ones(B, n, 1, dtype=x.dtype, device=x.device)
        policy = torch.ones(B, n + 1, 1, dtype=x.dtype, device=x.device) if self.training else None
        keep_decisions: List[Tensor] = []
        for s, (lo, hi) in enumerate(self._segments):
            if s > 0:
                score = self.score_predictor[s - 1](x[:, 1:], decision).reshape(B, -1, 2)
                if self.training:
                    decision = F.gumbel_softmax(score, hard=True)[:, :, 0:1] * decision
                    keep_decisions.append(decision.reshape(B, n))
                    policy = torch.cat([decision.new_ones(B, 1, 1), decision], dim=1)
                else:
                    x, decision = self._prune(x, score[:, :, 0], decision, self.num_keep[s - 1])
            blocks = self.blocks[lo:hi]
            x = self.run_blocks(blocks, x) if policy is None else self.run_blocks(blocks, x, policy)
        return self.norm(x), decision, keep_decisions

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, img_size, img_size]`` -> the normalised tokens, class token first:
        ``[B, 1 + n, embed_dim]`` in training, ``[B, 1 + num_keep[-1], embed_dim]`` in eval."""
        return self._forward_tokens(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The class token through ``pre_logits``, then ``head`` unless ``pre_logits``."""
        x = self.pre_logits(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, return_aux: bool = False) -> Any:
        """The logits; with ``return_aux`` in training, what the official training forward returns
        for DynamicViT's losses: ``(logits, features, decision, keep_decisions)`` with
        ``distill``, ``(logits, keep_decisions)`` without (module docstring)."""
        tokens, decision, keep_decisions = self._forward_tokens(x)
        logits = self.forward_head(tokens)
        if not (return_aux and self.training):
            return logits
        if self.distill:
            return logits, tokens[:, 1:], decision.detach(), keep_decisions
        return logits, keep_decisions


@register
def dynamicvit_deit_small(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT-DeiT-S/0.7 (the official ``deit-s`` with ``base_rate`` 0.7): DeiT-S (16 x 16
    patches at 224 x 224, width 384, depth 12, 6 heads, MLP ratio 4, qkv bias) with score
    predictors before blocks 3, 6 and 9 keeping 0.7, 0.7**2 and 0.7**3 of the 196 patches (137,
    96 and 67 in eval), with distillation outputs; 22.77 M parameters. Keyword arguments override
    the configuration (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
    ``pruning_loc``, ``token_ratio``, ...)."""
    base_rate = 0.7
    config = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4., qkv_bias=True,
                  pruning_loc=(3, 6, 9), token_ratio=(base_rate, base_rate ** 2, base_rate ** 3), distill=True)
    return build("dynamicvit_deit_small", DynamicViT, pretrained, config, kwargs, default_cfgs["dynamicvit_deit_small"])
