"""Analytic compute of a T5 training step (dense matmuls and attention, as executed).

Per example, with d = d_model, A = num_heads * head_dim, f = d_ff, V = vocab_size,
n = num_layers, I = encoder length, O = decoder length (a multiply-add = 2 FLOPs):

    encoder   I * n * (8 d A        # q, k, v, out projections
                       + 6 d f      # wi_0, wi_1, wo
                       + 4 I A)     # q.k scores and weights.v (full, unmasked)
    decoder   O * n * (8 d A + 6 d f + 4 O A      # self-attention and MLP
                       + 4 d A + 4 I A)           # cross-attention q, out; scores, values
              + I * n * 4 d A                      # cross-attention k, v of the encoder
              + O * 2 d V                          # logits

A training step is 3x the forward pass (the backward pass costs two). Fused models are
counted dense: their zero-initialised cross blocks are multiplied like any weights.
Norms, softmax, activations and the embedding gather are left out (under 1% at these sizes).
"""

from __future__ import annotations

from deepfusion_core.config import T5Config


def forward_flops(cfg: T5Config, batch: int, inputs_length: int, targets_length: int) -> int:
    """FLOPs of one forward pass over `batch` examples of the given lengths."""
    d, f, n, v = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.vocab_size
    a = cfg.num_heads * cfg.head_dim
    i, o = inputs_length, targets_length
    encoder = i * n * (8 * d * a + 6 * d * f + 4 * i * a)
    decoder = (o * n * (8 * d * a + 6 * d * f + 4 * o * a + 4 * d * a + 4 * i * a)
               + i * n * 4 * d * a + o * 2 * d * v)
    return batch * (encoder + decoder)


def train_step_flops(cfg: T5Config, batch: int, inputs_length: int, targets_length: int) -> int:
    """FLOPs of one training step (forward + backward = 3x forward)."""
    return 3 * forward_flops(cfg, batch, inputs_length, targets_length)
