"""Compressive Transformer (Rae et al. 2020, "Compressive Transformers for Long-Range Sequence
Modelling", ICLR 2020, arXiv 1911.05507).

Transformer-XL (:mod:`architectures.transformer_xl`) plus a second, coarser memory per layer:
when the oldest ``seg_len`` positions leave the memory of ``mem_len`` positions, a compression
function ``f_c`` maps them to ``seg_len / compression_rate`` vectors that join a compressed
memory of ``cmem_len`` slots (the oldest slots drop out). Queries attend over
``[compressed memory; memory; segment]``, with Transformer-XL's relative positions counted along
that concatenation, as the paper does. The paper's knobs: n_s (``seg_len``), n_m (``mem_len``),
n_cm (``cmem_len``), c (``compression_rate``), f_c (``compression``: ``conv``, a 1-D convolution
of kernel and stride c, the paper's choice; or ``mean`` / ``max`` pooling of c positions).
``cmem_len = 0`` is Transformer-XL exactly (same parameters, same outputs).

Training (the paper's section 3.2): the compressed memory is detached like the memory, so the task
loss never reaches f_c; f_c learns only from the **attention-reconstruction loss**: for each
segment's queries h and the positions it evicts, ``|| attn(h, old) - attn(h, f_c(old)) ||^2``,
with the layer's own (content-only) attention weights and h, old stopped. The model leaves that
loss in ``self.aux_loss`` after a training forward; the trainer adds it to the task loss (it
reaches only f_c's parameters, so this is the paper's separate optimisation).

Which context a query sees, written out: query t of segment s (start ``a = s * seg_len``) sees
memory positions ``[a - mem_len, a)`` and the compressed slots of positions
``[a - mem_len - cmem_len * c, a - mem_len)``, slot k summarising c consecutive positions. As in
Transformer-XL, one call runs all segments of a layer at once (each segment's memory and
compressed memory are known once the layer below is done). With ``compression_rate = 1`` and an
identity f_c (``mean`` of one position) the compressed memory is just more memory: the model
then equals Transformer-XL with ``mem_len + cmem_len`` (tested), which the Transformer-XL tests
in turn check against recomputing the full context.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from architectures.backbone import run_block
from architectures.layers import sinusoidal_positions
from architectures.transformer_xl import RelativeAttention, TransformerXL, segment_mask

COMPRESSIONS = ("conv", "mean", "max")


class Compression(nn.Module):
    """f_c: (B, T, D) -> (B, T // rate, D), each output from ``rate`` consecutive inputs."""

    def __init__(self, d_model: int, *, rate: int, kind: str):
        super().__init__()
        self.rate, self.kind = rate, kind
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate) if kind == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < self.rate:  # nothing to compress yet (pooling refuses empty inputs)
            return x[:, :0]
        x = x.transpose(1, 2)  # (B, D, T)
        if self.kind == "conv":
            y = self.conv(x)
        elif self.kind == "mean":
            y = F.avg_pool1d(x, self.rate)
        else:
            y = F.max_pool1d(x, self.rate)
        return y.transpose(1, 2)  # (B, T // rate, D)


def content_attention(attn: RelativeAttention, h: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The layer's content attention with its weights held fixed (the reconstruction loss must not
    train them): h (N, S, D) queries over keys (N, M, D) where ``valid`` (N, M) -> (N, H, S, hd)."""
    N, S, D = h.shape
    M = keys.shape[1]
    H, hd = attn.n_heads, attn.head_dim
    q = F.linear(h, attn.q.weight.detach()).view(N, S, H, hd).transpose(1, 2)  # (N, H, S, hd)
    k, v = F.linear(keys, attn.kv.weight.detach()).view(N, M, 2, H, hd).permute(2, 0, 3, 1, 4)  # 2 x (N, H, M, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


class CompressiveTransformer(TransformerXL):
    """Transformer-XL with a compressed memory per layer (see the module docstring).

    Args:
        cmem_len: compressed-memory slots per layer (the paper's n_cm); 0 is Transformer-XL.
        compression_rate: positions per compressed slot (the paper's c); must divide
            ``seg_len`` and ``mem_len``.
        compression: ``conv`` | ``mean`` | ``max`` (f_c).
        reconstruction_weight: weight of the attention-reconstruction loss in ``aux_loss``.
        Everything else as :class:`architectures.transformer_xl.TransformerXL`.
    """

    def __init__(self, *, cmem_len: int, compression_rate: int, compression: str = "conv",
                 reconstruction_weight: float = 1.0, **xl):
        super().__init__(**xl)
        S, W = self.seg_len, self.mem_len
        if cmem_len < 0 or compression_rate < 1:
            raise ValueError(f"model.cmem_len must be >= 0 and model.compression_rate >= 1, got {cmem_len} "
                             f"and {compression_rate}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"model.compression must be one of {COMPRESSIONS}, got {compression!r}")
        if cmem_len and (W == 0 or S % compression_rate or W % compression_rate):
            raise ValueError(
                f"a compressed memory needs model.mem_len > 0 and model.compression_rate={compression_rate} "
                f"dividing model.seg_len={S} and model.mem_len={W} (positions leave the memory a segment at a time)"
            )
        t = self.train_lengths
        if cmem_len and (t.clamp_len > 0 or t.same_length or self.eval_lengths != t):
            raise ValueError(
                "a compressed memory (model.cmem_len > 0) reads with one set of lengths and no distance clamp: "
                "leave model.clamp_len <= 0, model.same_length false and model.eval_* null (Transformer-XL's "
                "evaluation lengths are for model=transformer_xl)")
        self.cmem_len, self.rate, self.reconstruction_weight = cmem_len, compression_rate, reconstruction_weight
        self.aux_loss: torch.Tensor | None = None
        if cmem_len:
            d_model = self.embed.embedding_dim
            # queries see up to cmem_len + mem_len + seg_len keys
            self.register_buffer("distances", sinusoidal_positions(S + W + cmem_len, d_model), persistent=False)
            self.compressions = nn.ModuleList(
                Compression(d_model, rate=compression_rate, kind=compression) for _ in self.blocks)

    def encode(self, tokens: torch.Tensor, mems: list | None = None):
        """Tokens (B, L) -> final hidden states (B, L, D), read in segments of ``seg_len``.

        Args:
            tokens: input ids.
            mems: per layer ``(memory (B, M0, D), compressed memory (B, C0, D))`` to start from,
                e.g. a previous call's ``last_mems``; None starts empty. Streaming across calls
                is exact when every call's length is a multiple of ``compression_rate``.

        Returns:
            The hidden states and the per-layer ``(memory, compressed memory)`` after this call
            (detached), or Transformer-XL's memories when ``cmem_len`` is 0.
        """
        if self.cmem_len == 0:
            return super().encode(tokens, mems)
        B, L = tokens.shape
        S, W, Cm, c = self.seg_len, self.mem_len, self.cmem_len, self.rate
        M0 = C0 = 0
        if mems is not None:
            M0, C0 = mems[0][0].shape[1], mems[0][1].shape[1]
            if len(mems) != len(self.blocks) or M0 > W or C0 > Cm or M0 % c or any(
                    m.shape[:2] != (B, M0) or cm.shape[:2] != (B, C0) for m, cm in mems):
                raise ValueError(
                    f"mems must be {len(self.blocks)} pairs (memory, compressed memory) of batch size {B}, at "
                    f"most model.mem_len={W} (a multiple of model.compression_rate={c}) and "
                    f"model.cmem_len={Cm} positions: a previous call's model.last_mems on the same batch size")
        n = -(-L // S)
        x = self.dropout(self.embed(tokens))  # (B, L, D)
        x = F.pad(x, (0, 0, 0, n * S - L))  # (B, n*S, D); the zero tail lies in every real token's future
        # positions -M0 .. L - W - 1 leave the memory during this call: n_new compressed slots
        n_new = max(0, L - W + M0) // c
        # segment s sees the Cm slots before those of position s*S - W: indices into [old slots; new slots]
        evicted = (torch.arange(n, device=x.device) * S - W + M0).clamp(min=0) // c  # (n,)
        slots = C0 + evicted[:, None] - Cm + torch.arange(Cm, device=x.device)  # (n, Cm)
        allowed = torch.cat([(slots >= 0)[:, None, :].expand(n, S, Cm),
                             segment_mask(n, S, W, M0, device=x.device)], dim=-1)  # (n, S, Cm + W + S)
        reconstruct = self.training and torch.is_grad_enabled() and self.compressions[0].conv is not None
        losses, new_mems = [], []
        for i, (block, compress) in enumerate(zip(self.blocks, self.compressions)):
            mem, cmem = (None, None) if mems is None else mems[i]
            past = x[:, :L].detach() if mem is None else torch.cat([mem, x[:, :L].detach()], 1)  # (B, M0 + L, D)
            with torch.no_grad():  # the task loss never reaches f_c
                stream = compress(past[:, : n_new * c])  # (B, n_new, D)
            if cmem is not None:
                stream = torch.cat([cmem, stream], 1)  # (B, C0 + n_new, D)
            older = F.pad(stream, (0, 0, Cm, 0))[:, slots.clamp(min=-Cm) + Cm]  # (B, n, Cm, D); index -k: zeros
            new_mems.append((past[:, -W:], stream[:, -Cm:]))
            if reconstruct:
                losses.append(self.reconstruction_loss(block, compress, x, past, M0, n_new))
            x = run_block(block, x, mem, allowed, self.distances, older.reshape(B * n, Cm, -1),
                          checkpointed=self.activation_checkpointing)
        if losses:  # summed over the calls of one forward (a pair task encodes twice)
            loss = self.reconstruction_weight * torch.stack(losses).mean()
            self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss
        return self.norm(x[:, :L]), new_mems

    def forward(self, batch: dict[str, torch.Tensor], mems: list | None = None) -> torch.Tensor:
        """As :meth:`TransformerXL.forward`; a training forward also sets ``self.aux_loss``."""
        self.aux_loss = None
        return super().forward(batch, mems)

    def reconstruction_loss(self, block, compress: Compression, x: torch.Tensor, past: torch.Tensor, M0: int,
                            n_new: int) -> torch.Tensor:
        """The paper's attention-reconstruction loss of one layer: each segment's queries attend to
        the positions it evicts, once as they are and once compressed; the squared difference of
        the two results, with queries, memories and attention weights held fixed.

        Segment s evicts positions ``[s*S - W, (s+1)*S - W)`` (only those compressed in this call:
        ``past`` rows ``0 .. n_new * c - 1``); x (B, n*S, D) is the layer input, ``past`` (B, M0 + L, D)."""
        B, LS, D = x.shape
        S, W, c = self.seg_len, self.mem_len, self.rate
        n = LS // S
        start = torch.arange(n, device=x.device) * S - W + M0  # (n,) first evicted row of ``past``
        rows = start[:, None] + torch.arange(S, device=x.device)  # (n, S)
        valid = (rows >= 0) & (rows < n_new * c)
        keep = valid.any(-1)  # segments that evict something compressed in this call
        if not keep.any():
            return x.new_zeros(())
        rows, valid, start = rows[keep], valid[keep], start[keep]
        k = rows.shape[0]
        norm = {name: p.detach() for name, p in block.norm1.named_parameters()}
        normed = lambda t: functional_call(block.norm1, norm, (t,))  # noqa: E731 (norm1 held fixed too)
        h = normed(x.detach().view(B, n, S, D)[:, keep]).reshape(B * k, S, D)
        old = past.detach()[:, rows.clamp(0, max(n_new * c - 1, 0))]  # (B, k, S, D)
        compressed = compress(past.detach()[:, : n_new * c])  # (B, n_new, D), with f_c's gradient
        slots = start[:, None] // c + torch.arange(S // c, device=x.device)  # (k, S / c)
        slot_ok = (slots >= 0) & (slots < n_new)
        compressed = compressed[:, slots.clamp(0, max(n_new - 1, 0))]  # (B, k, S / c, D)
        expand = lambda m: m.expand(B, *m.shape).reshape(B * k, -1)  # noqa: E731 (n, M) -> (B * k, M)
        target = content_attention(block.attn, h, normed(old).reshape(B * k, S, D), expand(valid))
        approx = content_attention(block.attn, h, normed(compressed).reshape(B * k, S // c, D), expand(slot_ok))
        return F.mse_loss(approx, target)
