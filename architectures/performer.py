"""Performer (Choromanski et al. 2021): softmax attention estimated with FAVOR+ random features.

FAVOR+ writes exp(q . k / sqrt(hd)) as the expectation of phi(q) . phi(k) with positive random
features phi(x)_j = exp(w_j . x' - |x'|^2 / 2) / sqrt(m), x' = x / hd^(1/4) and w_j ~ N(0, I)
(orthogonal within blocks), so that attention becomes linear attention with these features
(architectures.linear). What follows the authors' code, google-research/performer
``fast_attention/jax/fast_attention.py`` (forked into LRA as
``lra_benchmarks/models/performer/performer_attention.py``, read at long-range-arena cd31e5c):

* the data normaliser hd^(-1/4) on queries and keys;
* the stabilisers, which cancel between the numerator and the normaliser: each query's max over
  its features, and for keys one max over all positions and features of a (batch, head). They
  are taken here over the whole exponent (w . x' - |x'|^2 / 2), which cancels the same and keeps
  the largest feature at exactly 1, so nothing underflows at any head size;
* a fresh projection on every call (``redraw_features=True``); here on every training forward
  call by default (``redraw_every: 1``), the projection kept fixed in evaluation.

``variant="lra_released"`` is the softmax kernel exactly as LRA's fork computes it (its
``make_fast_softmax_attention`` defaults, which LRA's ListOps config keeps): every feature gets
``numerical_stabilizer`` 1e-6 added after the exponential, the stabilisers are the max of
w . x' alone (not of the whole exponent, and not detached), the normaliser is bumped by 2e-6
where it is at most 1e-6, and a fresh projection is drawn on every call, in evaluation too,
from a seed computed from the queries (``PRNGKey(ceil(sum(query) * 1e7))``: the same batch gets
the same draw). :func:`released_favor_attention` computes it in linear time;
:func:`released_favor_reference` forms the (L, L) weights.

``kernel="relu"`` is LRA's released default instead (``make_fast_generalized_attention`` with
its defaults: ``features_type='deterministic'``, no projection, no data normaliser,
phi(x) = relu(x) + 1e-3), which LRA ran on every task but ListOps.

The bidirectional softmax form runs through :class:`FavorAttention`: it never holds a
(B, H, L, m) feature tensor, but computes features for ``rows`` positions at a time, forward and
backward (recomputed there), and takes the gradient of the numerator and the normaliser in one
product. The plain
:func:`favor_features` + ``quadratic_linear_attention`` form is the reference it is tested
against; the causal form uses :func:`favor_features` with the chunked causal linear attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from architectures.layers import UnsupportedTask
from architectures.lra import check_mixer_variant
from architectures.linear import LinearAttention

KERNELS = ("softmax", "relu")
RELEASED_EPS = 1e-6  # make_fast_softmax_attention's numerical_stabilizer in LRA's fork
RELU_KERNEL_EPS = 1e-3  # LRA's kernel_epsilon, added to every ReLU feature
FEATURE_CHUNK_BYTES = 2 * 2**20  # one chunk of features; measured best of 0.5-8 MiB (L=4096, B=4, 256 features)
NO_KEY = -1e30  # the key stabiliser before any (unpadded) key is seen


def orthogonal_random_features(n_features: int, dim: int, device=None,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """FAVOR+'s projection (n_features, dim): blocks of orthonormal rows, each rescaled to the
    norm of an independent Gaussian vector so that every row is marginally N(0, I) (the
    reference's ``GaussianOrthogonalRandomMatrix`` with ``scaling=0``)."""
    blocks = []
    for _ in range(math.ceil(n_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.T)  # rows orthonormal
    w = torch.cat(blocks)[:n_features]  # (m, dim)
    norms = torch.randn(n_features, dim, generator=generator).norm(dim=1, keepdim=True)  # chi(dim) lengths
    return (w * norms).to(device)


def released_projection(q: torch.Tensor, n_features: int) -> torch.Tensor:
    """The projection LRA's fork draws on every call, from a seed computed from all the queries
    q (B, H, L, hd): ``ceil(sum(q) * 1e7)``, so a batch always gets the same draw."""
    seed = math.ceil(float(q.detach().double().sum()) * 1e7) % 2**63
    generator = torch.Generator().manual_seed(seed)
    return orthogonal_random_features(n_features, q.shape[-1], q.device, generator).to(q.dtype)


def released_favor_features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """LRA's ``nonnegative_softmax_kernel_feature_creator``: (exp(w . x' - |x'|^2 / 2 - max) + 1e-6)
    / sqrt(m), the max of w . x' over the features (a query) or over the positions and features of
    a (batch, head) (keys); x (B, H, L, hd) -> (B, H, L, m)."""
    xs = x * x.shape[-1] ** -0.25
    dash = xs @ projection.T  # (B, H, L, m)
    half_sq = (xs * xs).sum(-1, keepdim=True) / 2  # (B, H, L, 1)
    top = dash.amax(-1, keepdim=True) if is_query else dash.amax((-2, -1), keepdim=True)
    return (torch.exp(dash - half_sq - top) + RELEASED_EPS) / math.sqrt(projection.shape[0])


def released_normaliser(den: torch.Tensor) -> torch.Tensor:
    """The fork's guard, ``R + 2 eps (|R| <= eps)`` with eps = 1e-6."""
    return den + 2 * RELEASED_EPS * (den.abs() <= RELEASED_EPS)


def released_favor_attention(q, k, v, projection: torch.Tensor) -> torch.Tensor:
    """LRA's bidirectional FAVOR in linear time: q, k, v (B, H, L, hd) -> (B, H, L, hd)."""
    phi_q = released_favor_features(q, projection, is_query=True)  # (B, H, L, m)
    phi_k = released_favor_features(k, projection, is_query=False)
    num = phi_q @ (phi_k.transpose(-2, -1) @ v)  # (B, H, L, hd)
    den = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1)  # (B, H, L, 1)
    return num / released_normaliser(den)


def released_favor_reference(q, k, v, projection: torch.Tensor) -> torch.Tensor:
    """The same through the (L, L) weights phi(q) phi(k)^T."""
    weights = released_favor_features(q, projection, is_query=True) @ \
        released_favor_features(k, projection, is_query=False).transpose(-2, -1)  # (B, H, L, L)
    return (weights @ v) / released_normaliser(weights.sum(-1, keepdim=True))


def favor_logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """The exponent of FAVOR+'s features, w_j . x' - |x'|^2 / 2 with x' = x / hd^(1/4).

    Args:
        x: (B, H, L, hd) queries or keys.
        projection: (m, hd).

    Returns:
        (B, H, L, m); the 1/sqrt(m) factor of the features cancels in the normaliser and is left out.
    """
    x = x * x.shape[-1] ** -0.25
    a = x @ projection.to(x.dtype).T  # (B, H, L, m)
    return a.sub_((x * x).sum(-1, keepdim=True) / 2)


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, *, is_query: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive random features with E[phi(q) . phi(k)] proportional to exp(q . k / sqrt(hd)).

    Stabilised as the reference does (module docstring): a query by its own max over features, the
    keys by their max over positions and features of each (batch, head), both detached (the
    output does not depend on them). Padding keys (``mask`` False) take no part in the max and get
    zero features.

    Args:
        x: (B, H, L, hd) queries or keys.
        projection: (m, hd) from :func:`orthogonal_random_features`.
        is_query: stabilise per position (queries) or over the sequence (keys).
        mask: (B, L) True at real tokens; keys only.

    Returns:
        (B, H, L, m) features, the largest of each query (and of each sequence's keys) exactly 1.
    """
    a = favor_logits(x, projection)
    if is_query:
        return torch.exp(a - a.detach().amax(-1, keepdim=True))
    keep = None if mask is None else mask[:, None, :, None]
    if keep is not None:
        a = a.masked_fill(~keep, -math.inf)  # exp(-inf) = 0, and no part in the max
    return torch.exp(a - a.detach().amax((-2, -1), keepdim=True).clamp_min(NO_KEY))


def relu_features(x: torch.Tensor) -> torch.Tensor:
    """LRA's generalized-attention features relu(x) + 1e-3 (no projection, no data normaliser)."""
    return F.relu(x) + RELU_KERNEL_EPS


def query_features_(r: torch.Tensor) -> torch.Tensor:
    """FAVOR+ query features from r = x' W^T (B, H, C, m), in place: exp(r - max_j r). The
    -|x'|^2 / 2 of the exponent is one more per-query constant, so the stabiliser removes it too."""
    return r.sub_(r.amax(-1, keepdim=True)).exp_()


def key_shift(x: torch.Tensor, r: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For keys x (B, H, C, hd) with r = x' W^T: |x'|^2 / 2 (B, H, C, 1), +inf at padding, and the
    chunk's stabiliser max over positions and features of r - |x'|^2 / 2, (B, H, 1, 1)."""
    xs = x * x.shape[-1] ** -0.25
    half_sq = (xs * xs).sum(-1, keepdim=True) / 2  # (B, H, C, 1)
    if keep is not None:
        half_sq = half_sq.masked_fill(~keep, math.inf)  # exp(r - inf) = 0: padding keys weigh nothing
    return half_sq, (r.amax(-1, keepdim=True) - half_sq).amax(-2, keepdim=True).clamp_min(NO_KEY)


class FavorAttention(torch.autograd.Function):
    """Bidirectional FAVOR+ attention, features computed ``rows`` positions at a time.

    Equal to ``quadratic_linear_attention(favor_features(q), favor_features(k, mask), v)`` with
    the normaliser guard ``tiny``. Keys fold into the summaries phi(K)^T V (B, H, m, hd) and
    phi(K)^T 1 (B, H, m, 1), rescaled whenever a later chunk raises the key stabiliser (as
    online softmax does); queries read them chunk by chunk. The backward pass recomputes each
    chunk's features, so the largest tensors held are (B, H, L, hd) and two (B, H, rows, m)
    chunks; the stabilisers get no gradient (the output does not depend on them). The gradient of
    a chunk's features takes the numerator's and the normaliser's paths in one product,
    [g_num g_den] [phi(K)^T V  phi(K)^T 1]^T; the forward products keep them apart because a
    GEMM with hd + 1 output columns ran at half the speed of one with hd = 16 on this CPU.
    """

    @staticmethod
    def forward(ctx, q, k, v, projection, mask, rows: int):
        q, k = q.contiguous(), k.contiguous()
        B, H, L, hd = q.shape
        m = projection.shape[0]
        wt = projection.T * hd ** -0.25  # (hd, m): r = x' W^T = x (W^T hd^(-1/4))
        keep = None if mask is None else mask[:, None, :, None]  # (B, 1, L, 1)
        kv, z = v.new_zeros(B, H, m, hd), v.new_zeros(B, H, m, 1)  # phi(K)^T V, phi(K)^T 1
        c_k = v.new_full((B, H, 1, 1), NO_KEY)
        for s in range(0, L, rows):
            kc = k[:, :, s:s + rows]
            r = kc @ wt  # (B, H, C, m)
            half_sq, c_chunk = key_shift(kc, r, None if keep is None else keep[:, :, s:s + rows])
            c_new = torch.maximum(c_k, c_chunk)
            phi = r.sub_(half_sq + c_new).exp_()
            decay = torch.exp(c_k - c_new)  # (B, H, 1, 1)
            kv.mul_(decay).add_(phi.transpose(-2, -1) @ v[:, :, s:s + rows])
            z.mul_(decay).add_(phi.sum(-2).unsqueeze(-1))
            c_k = c_new
        num, den = v.new_empty(B, H, L, hd), v.new_empty(B, H, L, 1)
        for s in range(0, L, rows):
            phi = query_features_(q[:, :, s:s + rows] @ wt)  # (B, H, C, m)
            num[:, :, s:s + rows] = phi @ kv
            den[:, :, s:s + rows] = phi @ z
        ctx.save_for_backward(q, k, v, projection, mask, kv, z, c_k, num, den)
        ctx.rows = rows
        return num / (den + torch.finfo(den.dtype).tiny)

    @staticmethod
    def backward(ctx, g_y):
        q, k, v, projection, mask, kv, z, c_k, num, den = ctx.saved_tensors
        rows, hd = ctx.rows, q.shape[-1]
        scale = hd ** -0.25
        wt = projection.T * scale  # (hd, m)
        keep = None if mask is None else mask[:, None, :, None]
        den = den + torch.finfo(den.dtype).tiny  # (B, H, L, 1)
        g_num = g_y / den  # (B, H, L, hd)
        g_den = -(g_y * num).sum(-1, keepdim=True) / (den * den)  # (B, H, L, 1)
        g_out, kvz = torch.cat([g_num, g_den], -1), torch.cat([kv, z], -1)  # (B, H, L | m, hd + 1)
        g_q, g_k, g_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g_kv, g_z = torch.zeros_like(kv), torch.zeros_like(z)

        def grad_of_input(x, g_a):  # a = w . x' - |x'|^2 / 2 with x' = x * scale: da/dx = (w - x') scale
            return (g_a @ projection - x * scale * g_a.sum(-1, keepdim=True)) * scale  # (B, H, C, hd)

        for s in range(0, q.shape[2], rows):
            qc = q[:, :, s:s + rows]
            phi = query_features_(qc @ wt)  # (B, H, C, m)
            g_kv += phi.transpose(-2, -1) @ g_num[:, :, s:s + rows]
            g_z += phi.transpose(-2, -1) @ g_den[:, :, s:s + rows]
            g_q[:, :, s:s + rows] = grad_of_input(qc, phi.mul_(g_out[:, :, s:s + rows] @ kvz.transpose(-2, -1)))
        g_kvz = torch.cat([g_kv, g_z], -1)  # (B, H, m, hd + 1)
        for s in range(0, k.shape[2], rows):
            kc, vc = k[:, :, s:s + rows], v[:, :, s:s + rows]
            r = kc @ wt
            half_sq, _ = key_shift(kc, r, None if keep is None else keep[:, :, s:s + rows])
            phi = r.sub_(half_sq + c_k).exp_()  # (B, H, C, m), zero at padding
            g_v[:, :, s:s + rows] = phi @ g_kv
            g_phi = F.pad(vc, (0, 1), value=1.0) @ g_kvz.transpose(-2, -1)  # [v 1] [g_kv g_z]^T
            g_k[:, :, s:s + rows] = grad_of_input(kc, phi.mul_(g_phi))
        return g_q, g_k, g_v, None, None, None


def favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
    mask: torch.Tensor | None = None, rows: int | None = None,
) -> torch.Tensor:
    """Bidirectional FAVOR+ attention (B, H, L, hd) through :class:`FavorAttention`, in float32
    at least; ``rows`` positions of features at a time (default: chunks of FEATURE_CHUNK_BYTES)."""
    B, H, L, hd = q.shape
    if rows is None:
        rows = max(16, FEATURE_CHUNK_BYTES // (B * H * projection.shape[0] * 4))
    low = v.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(v.device.type, enabled=False):
        q, k, vf = (t.float() if low else t for t in (q, k, v))
        y = FavorAttention.apply(q, k, vf, projection.to(vf.dtype), mask, rows)
    return y.to(v.dtype)


class PerformerAttention(LinearAttention):
    """Performer attention, the ``performer`` mixer.

    Estimates softmax attention with ``n_features`` positive orthogonal random features per head
    size (shared by the heads of a layer), or runs LRA's generalized ReLU kernel. Everything else
    is :class:`LinearAttention`.

    Args:
        n_features: random features m (the paper's LRA runs use 256); softmax kernel only.
        redraw_every: draw a fresh projection every this many training-mode forward calls of
            the model (0 = never; 1 = every call, as the reference), counted by
            :meth:`before_training_forward` in the ``forward_calls`` buffer, so resuming a
            checkpoint keeps the schedule; both sequences of a ``pair`` task share one draw.
            Softmax kernel only.
        kernel: ``softmax`` (FAVOR+) or ``relu`` (LRA's generalized attention).
        variant: ``paper`` or ``lra_released``: the softmax kernel as LRA's fork computes it
            (module docstring; bidirectional, ``redraw_every: 1``, ``mask_padding: false``); the
            relu kernel is LRA's own
            either way.
        Other arguments as for :class:`LinearAttention`.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, n_features: int = 256,
        redraw_every: int = 1, kernel: str = "softmax", chunk_size: int = 64, mask_padding: bool = True,
        qkv_dim: int | None = None, variant: str = "paper",
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, chunk_size=chunk_size,
                         mask_padding=mask_padding, qkv_dim=qkv_dim)
        check_variant(variant, causal=causal, kernel=kernel, redraw_every=redraw_every, mask_padding=mask_padding)
        self.released = variant == "lra_released" and kernel == "softmax"
        if n_features < 1 or redraw_every < 0:
            raise ValueError(
                f"model.mixer.n_features must be >= 1 and redraw_every >= 0, got {n_features}, {redraw_every}"
            )
        if kernel not in KERNELS:
            raise ValueError(f"model.mixer.kernel={kernel!r} is not one of {', '.join(KERNELS)} "
                             "(softmax: FAVOR+ random features; relu: LRA's generalized attention)")
        self.kernel = kernel
        self.n_features = n_features
        self.redraw_every = redraw_every if kernel == "softmax" and not self.released else 0  # released: per call
        self.register_buffer("projection", orthogonal_random_features(n_features, self.qkv_dim // n_heads))
        self.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def redraw(self) -> None:
        # a new tensor, not an in-place copy: a pending backward may still hold the old one
        old = self.projection
        self.projection = orthogonal_random_features(self.n_features, old.shape[1], old.device).to(old.dtype)

    def feature_maps(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel == "relu":
            return relu_features(q), relu_features(k)
        return (favor_features(q, self.projection, is_query=True),
                favor_features(k, self.projection, is_query=False, mask=mask))

    def eps(self, dtype: torch.dtype) -> float:
        # features are positive and scaled by stabilisers: guard only against 0 / 0 (the
        # reference adds nothing for the ReLU kernel, numerical_stabilizer=0.0)
        return torch.finfo(dtype).tiny

    def attend(self, q, k, v, mask):
        if self.released:  # a fresh draw on every call, evaluation included, as LRA's fork
            return released_favor_attention(q, k, v, released_projection(q, self.n_features))
        if self.causal or self.kernel == "relu":
            return super().attend(q, k, v, mask)
        return favor_attention(q, k, v, self.projection, mask)

    def before_training_forward(self) -> None:
        """Count a training-mode forward call of the model and redraw when one is due. The shared
        backbone calls it once per model forward (architectures.backbone), never from a block's
        recomputation under activation checkpointing, which must see the projection it saw."""
        if self.redraw_every > 0:
            calls = int(self.forward_calls)
            if calls > 0 and calls % self.redraw_every == 0:
                self.redraw()
            self.forward_calls += 1

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token of the causal recurrence. The softmax kernel's key stabiliser is the running
        max of the keys so far: the state (sum phi(k) v^T, sum phi(k), max) is rescaled when it
        grows, which cancels in the output as the sequence-wide max of the forward pass does."""
        if self.kernel == "relu":
            return super().step(x_t, state)
        B = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(B, 3, self.n_heads, -1).unbind(1)  # (B, H, hd)
        phi_q = favor_features(q.unsqueeze(2), self.projection, is_query=True).squeeze(2)  # (B, H, m)
        a = favor_logits(k.unsqueeze(2), self.projection).squeeze(2)  # (B, H, m)
        if state is None:
            state = (a.new_zeros(*a.shape, v.shape[-1]), torch.zeros_like(a), a.new_full(a.shape[:2], NO_KEY))
        kv, z, c = state
        c_new = torch.maximum(c, a.amax(-1))  # (B, H)
        decay = torch.exp(c - c_new)[..., None]  # (B, H, 1)
        phi_k = torch.exp(a - c_new[..., None])  # (B, H, m)
        kv = kv * decay[..., None] + phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, m, hd)
        z = z * decay + phi_k
        num = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)  # (B, H, hd)
        y = num / ((phi_q * z).sum(-1, keepdim=True) + self.eps(x_t.dtype))
        return self.out(y.reshape(B, self.qkv_dim)), (kv, z, c_new)


def check_variant(variant: str, *, causal: bool, kernel: str, redraw_every: int, mask_padding: bool) -> None:
    """Refuse a variant the mixer does not have, or settings LRA's fork does not run, naming the key."""
    check_mixer_variant(variant)
    if variant == "lra_released" and kernel == "softmax":
        if causal:
            raise UnsupportedTask("performer variant=lra_released is LRA's bidirectional FAVOR (ListOps); "
                                  "causal tasks take variant=paper")
        if mask_padding:
            raise ValueError("performer variant=lra_released takes no padding mask (LRA's FAVOR ignores the bias "
                             "that carries it); set model.mixer.mask_padding=false")
        if redraw_every != 1:
            raise ValueError("performer variant=lra_released draws a projection on every call (LRA's "
                             f"redraw_features=True); model.mixer.redraw_every must be 1, got {redraw_every}")
