"""adaLN-Zero transformer block shared by the routing pool.

The block is written in stages (modulation, attention projections, MLP) so that token-level
routing can apply each token's chosen block weights to that token alone while attention still
runs over every token of the image.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return `x * (1 + scale) + shift`, where `shift` and `scale` broadcast against `x` (B, T, D).

    `1 + scale` is computed on the small (B, 1, D) rows, and `torch.addcmul` does the multiply and
    the add in one pass over `x`.
    """
    return torch.addcmul(shift, x, 1 + scale)


class MoLBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning and SDPA self-attention.

    Args:
        hidden_size (`int`): Token width D.
        num_attention_heads (`int`): Number of attention heads; `hidden_size` must divide evenly.
        mlp_ratio (`float`): Hidden width of the MLP as a multiple of `hidden_size`.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        mlp_hidden = int(hidden_size * mlp_ratio)

        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.to_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        # Six modulation vectors per sample: shift, scale and gate for attention and for the MLP.
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def initialize_weights(self) -> None:
        """Xavier-initialise the projections and zero the adaLN modulation.

        Zero modulation makes every gate zero, so each block starts as the identity. A fresh
        model is then stable at any routing depth, and the router gets the same input whatever
        it picks until the first update makes the gates non-zero.
        """
        for layer in (self.to_qkv, self.to_out, self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.ada_ln[-1].weight)
        nn.init.zeros_(self.ada_ln[-1].bias)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, 1, D)."""
        return self.ada_ln(cond).unsqueeze(1).chunk(6, dim=-1)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Run multi-head SDPA over all tokens: (B, T, 3D) -> (B, T, D)."""
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_attention_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return rearrange(out, "b h t d -> b t (h d)")

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Apply the block to tokens `x` (B, T, D) under conditioning `cond` (B, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
        qkv = self.to_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        x = torch.addcmul(x, gate_msa, self.to_out(self.attention(qkv)))  # x + gate * update, in one pass
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and linear projection from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def initialize_weights(self) -> None:
        """Zero the modulation and the output projection, so a fresh model predicts zero (as DiT)."""
        for layer in (self.ada_ln[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C_out)
