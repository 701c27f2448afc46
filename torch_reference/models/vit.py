"""A Vision Transformer from scratch in PyTorch: the twin of `jaxvision.models.vit`.

Same architecture, attribute names and presets; see that module's docstring for the design and
its deviations from Dosovitskiy et al. 2020. Input is NCHW; patches are flattened in (py, px, C)
order as in Flax, so the patch embedding converts with a plain transpose.
"""

import torch
import torch.nn.functional as F
from torch import nn

from jaxvision.core.model_configs import VIT_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import ViTConfig
from jaxvision.core.positional import sinusoidal_encoding


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, each flattened (py, px, C)."""
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    x = x.reshape(b, h // p, p, w // p, p, c)  # (B, gh, p, gw, p, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)  # (B, N, p*p*C)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.dim
        self.heads = config.heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(config.attn_dropout)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D). Returns (B, T, D) and the attention weights (B, heads, T, T)."""
        b, t, d = x.shape
        h = self.heads

        def split_heads(y):
            return y.reshape(b, t, h, d // h).transpose(1, 2)  # (B, T, D) -> (B, h, T, hd)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        scores = q @ k.transpose(-2, -1) * (d // h) ** -0.5  # (B, h, T, T)
        attn = scores.softmax(dim=-1)  # (B, h, T, T), rows sum to 1
        y = self.attn_drop(attn) @ v  # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, h, T, hd) -> (B, T, D)
        return self.proj_drop(self.proj(y)), attn


class MLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.gelu(self.fc1(x), approximate="none"))  # (B, T, mlp_dim)
        return self.drop(self.fc2(x))  # (B, T, D)


class Block(nn.Module):
    """Pre-LN encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.ln_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.ln_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x))
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class ViT(nn.Module):
    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Linear(c.patch_dim, c.dim)
        if c.pool == "cls":
            self.cls_token = nn.Parameter(torch.randn(1, 1, c.dim) * 0.02)
        if c.pos_encoding == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, c.num_tokens, c.dim) * 0.02)
        else:  # a constant, not part of the state_dict
            pe = torch.from_numpy(sinusoidal_encoding(c.num_tokens, c.dim))[None]
            self.register_buffer("sinusoidal", pe, persistent=False)
        self.pos_drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
        self.head = nn.Linear(c.dim, c.num_classes)

    def position_encoding(self) -> torch.Tensor:
        return self.pos_embed if self.config.pos_encoding == "learned" else self.sinusoidal

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x: (B, C, H, W). Returns the normalised tokens (B, T, D) and named intermediates."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"ViT expects (B, {c.in_channels}, {c.image_size}, {c.image_size}) "
                f"NCHW input, got {tuple(x.shape)}"
            )
        out = {}
        out["patches"] = x = patchify(x, c.patch_size)  # (B, N, p*p*C)
        out["patch_embed"] = x = self.patch_embed(x)  # (B, N, D)
        if c.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        out["embed"] = x = x + self.position_encoding()  # (B, T, D)
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            x, attn = block(x)
            out[f"block{i}"], out[f"attn{i}"] = x, attn  # (B, T, D), (B, heads, T, T)
        out["features"] = x = self.norm(x)  # (B, T, D)
        return x, out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the [CLS] token, or the mean of the patch tokens."""
        return x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x, out = self.forward_features(x)
        out["pre_logits"] = x = self.pool(x)  # (B, D)
        out["logits"] = x = self.head(x)  # (B, num_classes)
        return x, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[0]
