"""Parity of the Flax ``Engram`` module with a PyTorch reference (docs/paper.md section 1).

PyTorch is the reference framework. The classes below restate the module semantics of the public
Engram demo (deepseek-ai/Engram, ``engram_demo_v1.py``: ``MultiHeadEmbedding``, ``ShortConv``,
``Engram``) for ``hc_mult`` residual branches: the single-branch cases (hc_mult = 1) check
``layers/engram.Engram``, the multi-branch ones (hc_mult = 2 and the demo's 4, at the end) check
``layers/engram_branches.MultiBranchEngram`` against the demo's per-branch key projections, norms
and gates and its ShortConv over hc_mult * D channels, plus the shared-gate ablation. Our module
gets every weight copied into the reference, hash ids come from our ``NgramHasher``, and we compare:

- the forward output Y [B, T, D];
- the gradients of a scalar loss w.r.t. the table, the hidden state and every other parameter
  (torch autograd vs ``jax.grad`` through an ``nnx.split`` / ``nnx.merge`` functional call);
- causality of both: changing the token (hence the hash ids) or the hidden state at t0 leaves the
  outputs before t0 bit-identical, and the two frameworks still agree on the changed inputs.

Epsilons are the demo's own: ``ShortConv`` builds its RMSNorm with ``norm_eps=1e-5`` and the gate's
key and query norms are ``nn.RMSNorm(hidden_size)`` with torch's default ``eps=None`` (the float32
machine epsilon 2**-23 at run time). The restatement below builds them exactly so, and
``test_norm_epsilons_are_the_demos`` checks our constants against it. The "tiny_scale" case feeds
inputs whose mean square is comparable to those epsilons, so there a wrong eps (the backbone's 1e-6
in any of the three norms) moves the output far outside the tolerances; at O(1) scale it would not.
The signed-square-root floor is 1e-6 in both, as in the demo.

Tolerances (float32 throughout, ``torch.set_default_dtype`` untouched, JAX x64 off):
outputs RTOL = ATOL = 1e-5; gradients GRAD_RTOL = GRAD_ATOL = 1e-4 relative to the gradient's own
scale (``_assert_close_scaled``), because the signed square root's derivative 1 / (2 sqrt|s|)
amplifies float32 rounding of the gate logit for tokens with a small |s|. These are the float32
bounds for summing a few hundred products in a different order; they are never widened per case.
Measured on these cases: outputs differ by at most ~2.9e-6 (|Y| up to ~9), gradients by at most
~1.7e-5 of their scale (w_k, through the signed square root), so both bounds keep a 3-6x margin,
while the backbone's 1e-6 in place of the demo's eps fails by far (conv norm: ~4e-4 on every
case, ~13 on tiny_scale; gate norms: ~0.07 on tiny_scale) and so would reversed conv taps (~7).
The multi-branch cases: outputs differ by at most ~1.7e-6.

Conv taps, norm scales and biases are set to non-zero random values (the paper zero-initialises
the taps and the norms start at 1, which would hide layout and dilation bugs).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest

# `make setup` installs no torch on a GPU or TPU machine (PyPI's Linux torch is a CUDA build whose
# libraries may clash with jax[cuda12]'s); TORCH=cpu installs PyTorch's CPU build for these tests.
TORCH_MISSING = ("torch is not installed: make setup leaves it out on GPU and TPU machines "
                 "(ACCEL=cuda or tpu), where PyPI's torch is a CUDA build; `make setup TORCH=cpu` "
                 "installs PyTorch's CPU build for the parity tests")
torch = pytest.importorskip("torch", reason=TORCH_MISSING)
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from engram_jax.config import EngramConfig  # noqa: E402
from engram_jax.hashing import NgramHasher  # noqa: E402
from engram_jax.layers.engram import Engram  # noqa: E402

DEMO_CONV_NORM_EPS = 1e-5  # engram_demo_v1.ShortConv(norm_eps=1e-5)
RTOL = 1e-5
ATOL = 1e-5
GRAD_RTOL = 1e-4
GRAD_ATOL = 1e-4
VOCAB = 1000  # compressed vocabulary size fed to the hasher
PAD_ID = 3


# ---------------------------------------------------------------------------------------------
# PyTorch reference (the demo's forward, any hc_mult)


class MultiHeadEmbedding(nn.Module):
    """One flat table for all heads; head i's ids are offset by sum(list_of_N[:i])."""

    def __init__(self, list_of_N: list[int], D: int):
        super().__init__()
        self.num_heads = len(list_of_N)
        self.embedding_dim = D
        offsets = [0]
        for n in list_of_N[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.embedding = nn.Embedding(num_embeddings=sum(list_of_N), embedding_dim=D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B,T,G] -> [B,T,G,D]
        return self.embedding(input_ids + self.offsets)


class ShortConv(nn.Module):
    """Per-branch RMSNorm -> depthwise dilated causal Conv1d over hc_mult * C channels (no bias)
    -> SiLU, on [B, T, hc_mult, C]."""

    def __init__(self, hidden_size: int, kernel_size: int = 4, dilation: int = 1,
                 norm_eps: float = 1e-5, hc_mult: int = 1, activation: bool = True):
        super().__init__()
        self.hc_mult = hc_mult
        self.activation = activation
        C = hidden_size * hc_mult
        self.conv = nn.Conv1d(C, C, kernel_size=kernel_size, groups=C, bias=False,
                              padding=(kernel_size - 1) * dilation, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,G,C] -> [B,T,G,C]
        B, T, G, C = x.shape
        assert G == self.hc_mult
        x_norm = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(G)], dim=-1)
        y = self.conv(x_norm.transpose(1, 2))[..., :T]
        if self.activation:
            y = F.silu(y)
        return y.transpose(1, 2).view(B, T, G, C).contiguous()


class TorchEngram(nn.Module):
    """The demo's Engram forward for ``hc_mult`` branches, given the layer's hash ids [B, T, G]
    and the hidden states [B, T, hc_mult, D] (the demo's ``Engram.forward``).

    ``gate`` / ``conv`` default to the reference (both on); turning one off is the ablation
    (alpha = 1, or Y = gated value) that our config exposes. ``shared_gate`` is the per-branch
    gating ablation (not in the demo; ``engram.gate_per_branch = False``): one key projection,
    key norm, query norm and gate, queried with the mean of the branches, for every branch.
    """

    def __init__(self, d_model: int, primes_flat: list[int], d_head: int, max_ngram: int,
                 kernel_size: int, hc_mult: int = 1, gate: bool = True, conv: bool = True,
                 shared_gate: bool = False):
        super().__init__()
        self.hc_mult = hc_mult
        self.shared_gate = shared_gate
        n_gates = 1 if shared_gate else hc_mult
        self.d_model = d_model
        self.use_gate, self.use_conv = gate, conv
        M = len(primes_flat) * d_head
        self.multi_head_embedding = MultiHeadEmbedding(primes_flat, d_head)
        # the demo leaves norm_eps at ShortConv's default (1e-5) and the gate norms' eps at
        # torch's default (None: finfo(float32).eps)
        self.short_conv = ShortConv(d_model, kernel_size=kernel_size, dilation=max_ngram,
                                    hc_mult=hc_mult)
        self.value_proj = nn.Linear(M, d_model)
        self.key_projs = nn.ModuleList([nn.Linear(M, d_model) for _ in range(n_gates)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(d_model) for _ in range(n_gates)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(d_model) for _ in range(n_gates)])

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.multi_head_embedding(hash_ids).flatten(start_dim=-2)  # [B,T,M]
        gates = []
        for hc_idx in range(self.hc_mult):
            i = 0 if self.shared_gate else hc_idx
            key = self.key_projs[i](embeddings)
            normed_key = self.norm1[i](key)
            query = (hidden_states.mean(dim=2) if self.shared_gate
                     else hidden_states[:, :, hc_idx, :])
            normed_query = self.norm2[i](query)
            gate = (normed_key * normed_query).sum(dim=-1) / math.sqrt(self.d_model)
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
            gate = gate.sigmoid().unsqueeze(-1)
            if not self.use_gate:
                gate = torch.ones_like(gate)
            gates.append(gate)
        gates = torch.stack(gates, dim=2)  # [B,T,hc_mult,1]
        value = gates * self.value_proj(embeddings).unsqueeze(2)  # [B,T,hc_mult,D]
        if not self.use_conv:
            return value
        return value + self.short_conv(value)


# ---------------------------------------------------------------------------------------------
# single-branch cases (hc_mult = 1); the multi-branch ones are at the end

REFERENCE_CASES = {
    # bigrams only, one head, D != M
    "n2_h1": dict(layer_ids=(0,), layer_id=0, max_ngram=2, heads=1, d_head=8,
                  table_sizes=(61,), kernel=4, D=24, B=2, T=19),
    # bigrams + trigrams, two heads per order, second layer (primes continue the global search)
    "n3_h2_layer2": dict(layer_ids=(1, 4), layer_id=4, max_ngram=3, heads=2, d_head=8,
                         table_sizes=(101, 53), kernel=4, D=32, B=2, T=23),
    # four heads per order, the paper's N = 3 and kernel 4 (dilation 3: reach 9 back)
    "n3_h4": dict(layer_ids=(2,), layer_id=2, max_ngram=3, heads=4, d_head=4,
                  table_sizes=(127, 131), kernel=4, D=48, B=3, T=29),
    # max_ngram 2 with three heads and a shorter kernel
    "n2_h3_k3": dict(layer_ids=(0, 1), layer_id=1, max_ngram=2, heads=3, d_head=16,
                     table_sizes=(97,), kernel=3, D=40, B=2, T=17),
    # table, biases and hidden state ~1e-3: mean squares ~1e-7..1e-6, where the norms' epsilons
    # (1e-5 conv, 2**-23 gate) change the normalised values by tens of percent
    "tiny_scale": dict(layer_ids=(1, 4), layer_id=4, max_ngram=3, heads=2, d_head=8,
                       table_sizes=(101, 53), kernel=4, D=32, B=2, T=23, scale=1e-3),
}
# Our config's ablation switches, checked against the reference with the same part removed.
ABLATION_CASES = {
    "no_gate": dict(REFERENCE_CASES["n3_h2_layer2"], gate=False),
    "no_conv": dict(REFERENCE_CASES["n3_h2_layer2"], conv=False),
}
ALL_CASES = {**REFERENCE_CASES, **ABLATION_CASES}


# ---------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def _setup(name: str) -> SimpleNamespace:
    """Our module (randomised taps, norm scales, biases), its torch copy, the hasher, inputs."""
    case = ALL_CASES[name]
    seed = 11 + list(ALL_CASES).index(name)
    ecfg = EngramConfig(
        layer_ids=case["layer_ids"], max_ngram=case["max_ngram"],
        heads_per_ngram=case["heads"], d_head=case["d_head"], table_sizes=case["table_sizes"],
        conv_kernel=case["kernel"], gate=case.get("gate", True), conv=case.get("conv", True),
        seed=seed,
    )
    lid, D = case["layer_id"], case["D"]
    ours = Engram(D, ecfg, lid, rngs=nnx.Rngs(seed))
    scale = case.get("scale", 1.0)
    rng = np.random.default_rng(seed + 1)

    def rand(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def around_one(shape):
        return jnp.asarray(1.0 + 0.5 * rng.standard_normal(shape), jnp.float32)

    # O(1) table rows so the gate logits spread over both signs and many magnitudes.
    ours.table.set_value(rand(ours.table[...].shape, scale))
    ours.b_v.set_value(rand((D,), 0.3 * scale))
    if ecfg.gate:
        ours.b_k.set_value(rand((D,), 0.3 * scale))
        ours.norm_k.weight.set_value(around_one((D,)))
        ours.norm_h.weight.set_value(around_one((D,)))
    if ecfg.conv:
        ours.conv_norm.weight.set_value(around_one((D,)))
        ours.conv_w.set_value(rand((ecfg.conv_kernel, D), 0.5))
        assert float(jnp.min(jnp.abs(ours.conv_w[...]))) > 0.0

    primes = ecfg.primes()[lid]
    primes_flat = [p for order in primes for p in order]  # order-major, as the hash ids
    ref = TorchEngram(D, primes_flat, ecfg.d_head, ecfg.max_ngram, ecfg.conv_kernel,
                      gate=ecfg.gate, conv=ecfg.conv)

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    with torch.no_grad():
        ref.multi_head_embedding.embedding.weight.copy_(t(ours.table[...]))
        ref.value_proj.weight.copy_(t(ours.w_v[...]).T)  # ours [M, D], torch [D, M]
        ref.value_proj.bias.copy_(t(ours.b_v[...]))
        if ecfg.gate:
            ref.key_projs[0].weight.copy_(t(ours.w_k[...]).T)
            ref.key_projs[0].bias.copy_(t(ours.b_k[...]))
            ref.norm1[0].weight.copy_(t(ours.norm_k.weight[...]))  # key norm
            ref.norm2[0].weight.copy_(t(ours.norm_h.weight[...]))  # query (hidden) norm
        if ecfg.conv:
            ref.short_conv.norms[0].weight.copy_(t(ours.conv_norm.weight[...]))
            # ours [W, D], tap j at t - (W-1-j)*dilation  ==  torch Conv1d weight [D, 1, W]
            ref.short_conv.conv.weight.copy_(t(ours.conv_w[...]).T.unsqueeze(1))

    hasher = NgramHasher(VOCAB, ecfg.table_sizes, ecfg.max_ngram, ecfg.heads_per_ngram,
                         ecfg.layer_ids, pad_id=PAD_ID, seed=seed)
    rng_in = np.random.default_rng(seed + 2)
    B, T = case["B"], case["T"]
    tokens = rng_in.integers(0, VOCAB, size=(B, T), dtype=np.int64)
    hidden = (scale * rng_in.standard_normal((B, T, D))).astype(np.float32)

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def apply(params, h, ids):
        return nnx.merge(graphdef, params, rest)(h, ids)

    return SimpleNamespace(case=case, ecfg=ecfg, lid=lid, ours=ours, ref=ref, hasher=hasher,
                           tokens=tokens, hidden=hidden, params=params, apply=apply,
                           fwd=jax.jit(apply))


def _run_ours(s: SimpleNamespace, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.asarray(s.fwd(s.params, jnp.asarray(hidden), jnp.asarray(ids, dtype=jnp.int32)))


def _run_ref(ref: TorchEngram, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = ref(torch.from_numpy(hidden).unsqueeze(2), torch.from_numpy(ids))
    assert out.shape[2] == 1
    return out[:, :, 0, :].numpy()


def _assert_close_scaled(actual, expected, name):
    """|a - e| <= GRAD_ATOL * max|e| + GRAD_RTOL * |e|, elementwise."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, name
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{name}: reference gradient is identically zero"
    np.testing.assert_allclose(actual, expected, rtol=GRAD_RTOL, atol=GRAD_ATOL * scale,
                               err_msg=name)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# tests


def test_norm_epsilons_are_the_demos():
    s = _setup("n3_h4")
    ref = s.ref
    assert ref.short_conv.norms[0].eps == DEMO_CONV_NORM_EPS
    assert ref.norm1[0].eps is None and ref.norm2[0].eps is None  # torch's default
    assert s.ours.conv_norm.eps == DEMO_CONV_NORM_EPS
    f32_eps = float(torch.finfo(torch.float32).eps)
    assert s.ours.norm_k.eps == s.ours.norm_h.eps == f32_eps == 2.0**-23


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_forward_matches_torch_reference(name):
    s = _setup(name)
    case, ecfg, ref = s.case, s.ecfg, s.ref
    # same table layout: per-head offsets are prefix sums of the order-major primes
    offsets = ref.multi_head_embedding.offsets.numpy()
    np.testing.assert_array_equal(offsets, np.asarray(s.ours.offsets))
    np.testing.assert_array_equal(offsets, s.hasher.offsets(s.lid))
    assert ref.multi_head_embedding.embedding.num_embeddings == s.ours.table[...].shape[0]

    ids = s.hasher(s.tokens)[s.lid]
    assert ids.shape == (case["B"], case["T"], ecfg.n_heads)
    y_ours = _run_ours(s, s.hidden, ids)
    y_ref = _run_ref(ref, s.hidden, ids)
    assert y_ours.shape == y_ref.shape == (case["B"], case["T"], case["D"])
    assert np.all(np.isfinite(y_ref))
    np.testing.assert_allclose(y_ours, y_ref, rtol=RTOL, atol=ATOL)

    if ecfg.conv:  # the conv branch is live (non-zero taps), so the comparison exercises it
        ref.use_conv = False
        try:
            y_noconv = _run_ref(ref, s.hidden, ids)
        finally:
            ref.use_conv = True
        assert np.max(np.abs(y_ref - y_noconv)) > 1e-2


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_gradients_match_torch_reference(name):
    s = _setup(name)
    ecfg, ref = s.ecfg, s.ref
    ids = s.hasher(s.tokens)[s.lid]
    probe = np.random.default_rng(7).standard_normal(s.hidden.shape).astype(np.float32)

    # torch autograd
    ref.zero_grad(set_to_none=True)
    h_t = torch.from_numpy(s.hidden.copy()).unsqueeze(2).requires_grad_(True)
    loss_t = (ref(h_t, torch.from_numpy(ids))[:, :, 0, :] * torch.from_numpy(probe)).sum()
    loss_t.backward()

    # jax.grad through the nnx.split / nnx.merge functional call
    def loss_fn(params, h):
        return jnp.sum(s.apply(params, h, jnp.asarray(ids, dtype=jnp.int32)) * jnp.asarray(probe))

    loss_j, (g_params, g_h) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        s.params, jnp.asarray(s.hidden))
    np.testing.assert_allclose(float(loss_j), loss_t.item(), rtol=RTOL,
                               atol=ATOL * float(np.abs(probe).sum()))

    g = nnx.to_pure_dict(g_params)
    if ecfg.gate:
        _assert_close_scaled(g_h, h_t.grad[:, :, 0, :].numpy(), "d/d hidden")
    else:  # without the gate the hidden state does not enter Y
        assert h_t.grad is None
        assert not np.any(np.asarray(g_h))

    emb = ref.multi_head_embedding.embedding.weight.grad.numpy()
    _assert_close_scaled(g["table"], emb, "d/d table")
    # rows that no token looked up get exactly zero gradient in both
    untouched = np.abs(emb).sum(-1) == 0
    assert 0 < np.count_nonzero(~untouched) < emb.shape[0]
    assert not np.any(np.asarray(g["table"])[untouched])

    _assert_close_scaled(g["w_v"], ref.value_proj.weight.grad.numpy().T, "d/d w_v")
    _assert_close_scaled(g["b_v"], ref.value_proj.bias.grad.numpy(), "d/d b_v")
    if ecfg.gate:
        _assert_close_scaled(g["w_k"], ref.key_projs[0].weight.grad.numpy().T, "d/d w_k")
        _assert_close_scaled(g["b_k"], ref.key_projs[0].bias.grad.numpy(), "d/d b_k")
        _assert_close_scaled(g["norm_k"]["weight"], ref.norm1[0].weight.grad.numpy(), "d/d norm_k")
        _assert_close_scaled(g["norm_h"]["weight"], ref.norm2[0].weight.grad.numpy(), "d/d norm_h")
    if ecfg.conv:
        _assert_close_scaled(g["conv_norm"]["weight"],
                             ref.short_conv.norms[0].weight.grad.numpy(), "d/d conv_norm")
        _assert_close_scaled(g["conv_w"], ref.short_conv.conv.weight.grad.numpy()[:, 0, :].T,
                             "d/d conv_w")


@pytest.mark.parametrize("name", ["n2_h1", "n3_h4"])
def test_causality_of_both(name):
    s = _setup(name)
    ids = s.hasher(s.tokens)[s.lid]
    y_ours = _run_ours(s, s.hidden, ids)
    y_ref = _run_ref(s.ref, s.hidden, ids)
    rng = np.random.default_rng(0)
    T = s.case["T"]
    for t0 in (0, T // 3, T - 1):
        tok2 = s.tokens.copy()
        tok2[:, t0] = (tok2[:, t0] + rng.integers(1, VOCAB, size=tok2.shape[0])) % VOCAB
        hid2 = s.hidden.copy()
        hid2[:, t0] += rng.standard_normal(hid2[:, t0].shape).astype(np.float32)
        ids2 = s.hasher(tok2)[s.lid]
        # hashing is causal: ids before t0 are unchanged, the ids at t0 change
        np.testing.assert_array_equal(ids2[:, :t0], ids[:, :t0])
        assert np.any(ids2[:, t0] != ids[:, t0])
        for changed_ids, changed_hidden in ((ids2, s.hidden), (ids, hid2), (ids2, hid2)):
            z_ours = _run_ours(s, changed_hidden, changed_ids)
            z_ref = _run_ref(s.ref, changed_hidden, changed_ids)
            # the two frameworks agree on the perturbed inputs too
            np.testing.assert_allclose(z_ours, z_ref, rtol=RTOL, atol=ATOL)
            # nothing before t0 moves, in either framework (exactly: same ops on the same values)
            np.testing.assert_array_equal(z_ours[:, :t0], y_ours[:, :t0])
            np.testing.assert_array_equal(z_ref[:, :t0], y_ref[:, :t0])
            # and the output at t0 does move
            assert np.max(np.abs(z_ours[:, t0] - y_ours[:, t0])) > 1e-4
            assert np.max(np.abs(z_ref[:, t0] - y_ref[:, t0])) > 1e-4


# ---------------------------------------------------------------------------------------------
# multi-branch (hc_mult > 1): ``MultiBranchEngram`` against the demo's Engram with hc_mult branches
# (one table and value projection, a key projection, key norm, query norm and gate per branch,
# ShortConv over hc_mult * D channels with one norm per branch), same tolerances.

HC_CASES = {
    # the demo's hc_mult = 4 with per-branch gates
    "hc4_n3_h2": dict(REFERENCE_CASES["n3_h2_layer2"], hc=4),
    "hc4_n3_h4": dict(REFERENCE_CASES["n3_h4"], hc=4),
    # the epsilons matter at this scale, now in every branch's norms
    "hc4_tiny_scale": dict(REFERENCE_CASES["tiny_scale"], hc=4),
    "hc2_n2_h3_k3": dict(REFERENCE_CASES["n2_h3_k3"], hc=2),
    # the per-branch gating ablation: one gate for all branches (engram.gate_per_branch = False)
    "hc4_shared_gate": dict(REFERENCE_CASES["n3_h2_layer2"], hc=4, gate_per_branch=False),
}


@functools.lru_cache(maxsize=None)
def _setup_hc(name: str) -> SimpleNamespace:
    from engram_jax.layers.engram_branches import MultiBranchEngram

    case = HC_CASES[name]
    seed = 101 + list(HC_CASES).index(name)
    nb = case["hc"]
    ecfg = EngramConfig(
        layer_ids=case["layer_ids"], max_ngram=case["max_ngram"],
        heads_per_ngram=case["heads"], d_head=case["d_head"], table_sizes=case["table_sizes"],
        conv_kernel=case["kernel"], gate_per_branch=case.get("gate_per_branch", True), seed=seed,
    )
    lid, D = case["layer_id"], case["D"]
    ours = MultiBranchEngram(D, ecfg, lid, nb, rngs=nnx.Rngs(seed))
    scale = case.get("scale", 1.0)
    rng = np.random.default_rng(seed + 1)

    def rand(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def around_one(shape):
        return jnp.asarray(1.0 + 0.5 * rng.standard_normal(shape), jnp.float32)

    ours.table.set_value(rand(ours.table[...].shape, scale))
    ours.b_v.set_value(rand((D,), 0.3 * scale))
    for g in ours.gates:
        g.b_k.set_value(rand((D,), 0.3 * scale))
        g.norm_k.weight.set_value(around_one((D,)))
        g.norm_h.weight.set_value(around_one((D,)))
    for n in ours.conv_norms:
        n.weight.set_value(around_one((D,)))
    ours.conv_w.set_value(rand((ecfg.conv_kernel, nb * D), 0.5))

    primes_flat = [p for order in ecfg.primes()[lid] for p in order]
    ref = TorchEngram(D, primes_flat, ecfg.d_head, ecfg.max_ngram, ecfg.conv_kernel, hc_mult=nb,
                      shared_gate=not ecfg.gate_per_branch)
    assert len(ref.key_projs) == len(ours.gates) == (nb if ecfg.gate_per_branch else 1)

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    with torch.no_grad():
        ref.multi_head_embedding.embedding.weight.copy_(t(ours.table[...]))
        ref.value_proj.weight.copy_(t(ours.w_v[...]).T)
        ref.value_proj.bias.copy_(t(ours.b_v[...]))
        for i, g in enumerate(ours.gates):
            ref.key_projs[i].weight.copy_(t(g.w_k[...]).T)
            ref.key_projs[i].bias.copy_(t(g.b_k[...]))
            ref.norm1[i].weight.copy_(t(g.norm_k.weight[...]))
            ref.norm2[i].weight.copy_(t(g.norm_h.weight[...]))
        for i, n in enumerate(ours.conv_norms):
            ref.short_conv.norms[i].weight.copy_(t(n.weight[...]))
        # ours [W, nb*D] (channel m*D + d)  ==  torch Conv1d weight [nb*D, 1, W]
        ref.short_conv.conv.weight.copy_(t(ours.conv_w[...]).T.unsqueeze(1))

    hasher = NgramHasher(VOCAB, ecfg.table_sizes, ecfg.max_ngram, ecfg.heads_per_ngram,
                         ecfg.layer_ids, pad_id=PAD_ID, seed=seed)
    rng_in = np.random.default_rng(seed + 2)
    B, T = case["B"], case["T"]
    tokens = rng_in.integers(0, VOCAB, size=(B, T), dtype=np.int64)
    hidden = (scale * rng_in.standard_normal((B, T, nb, D))).astype(np.float32)  # branches differ

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def apply(params, h, ids):
        return nnx.merge(graphdef, params, rest)(h, ids)

    return SimpleNamespace(case=case, ecfg=ecfg, lid=lid, nb=nb, ours=ours, ref=ref, hasher=hasher,
                           tokens=tokens, hidden=hidden, params=params, apply=apply,
                           fwd=jax.jit(apply))


def _run_ref_hc(ref: TorchEngram, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(hidden), torch.from_numpy(ids)).numpy()


def test_multi_branch_epsilons_are_the_demos():
    s = _setup_hc("hc4_n3_h2")
    f32_eps = float(torch.finfo(torch.float32).eps)
    assert all(n.eps == DEMO_CONV_NORM_EPS for n in s.ref.short_conv.norms)
    assert all(n.eps == DEMO_CONV_NORM_EPS for n in s.ours.conv_norms)
    assert all(g.norm_k.eps == g.norm_h.eps == f32_eps for g in s.ours.gates)
    assert len(s.ours.conv_norms) == len(s.ref.short_conv.norms) == 4


@pytest.mark.parametrize("name", list(HC_CASES))
def test_multi_branch_forward_matches_torch_reference(name):
    s = _setup_hc(name)
    ids = s.hasher(s.tokens)[s.lid]
    y_ours = _run_ours(s, s.hidden, ids)
    y_ref = _run_ref_hc(s.ref, s.hidden, ids)
    assert y_ours.shape == y_ref.shape == (s.case["B"], s.case["T"], s.nb, s.case["D"])
    np.testing.assert_allclose(y_ours, y_ref, rtol=RTOL, atol=ATOL)
    # the branches get different outputs (per-branch gates, or per-branch conv norms and taps)
    assert np.max(np.abs(y_ref[:, :, 0] - y_ref[:, :, 1])) > 1e-2 * (s.case.get("scale", 1.0))
    if s.ecfg.gate_per_branch:  # each branch's gate reads its own branch: moving branch 1 ...
        hid2 = s.hidden.copy()
        hid2[:, :, 1] = np.roll(hid2[:, :, 1], 1, axis=-1)
        z = _run_ours(s, hid2, ids)
        np.testing.assert_array_equal(z[:, :, [0, 2, 3][: s.nb - 1]],
                                      y_ours[:, :, [0, 2, 3][: s.nb - 1]])  # ... moves only it
        assert np.max(np.abs(z[:, :, 1] - y_ours[:, :, 1])) > 1e-4


@pytest.mark.parametrize("name", list(HC_CASES))
def test_multi_branch_gradients_match_torch_reference(name):
    s = _setup_hc(name)
    ref = s.ref
    ids = s.hasher(s.tokens)[s.lid]
    probe = np.random.default_rng(7).standard_normal(s.hidden.shape).astype(np.float32)

    ref.zero_grad(set_to_none=True)
    h_t = torch.from_numpy(s.hidden.copy()).requires_grad_(True)
    (ref(h_t, torch.from_numpy(ids)) * torch.from_numpy(probe)).sum().backward()

    def loss_fn(params, h):
        return jnp.sum(s.apply(params, h, jnp.asarray(ids, dtype=jnp.int32)) * jnp.asarray(probe))

    g_params, g_h = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(s.params, jnp.asarray(s.hidden))
    g = nnx.to_pure_dict(g_params)
    _assert_close_scaled(g_h, h_t.grad.numpy(), "d/d hidden")
    _assert_close_scaled(g["table"], ref.multi_head_embedding.embedding.weight.grad.numpy(),
                         "d/d table")
    _assert_close_scaled(g["w_v"], ref.value_proj.weight.grad.numpy().T, "d/d w_v")
    _assert_close_scaled(g["b_v"], ref.value_proj.bias.grad.numpy(), "d/d b_v")
    for i in range(len(ref.key_projs)):
        gi = g["gates"][i]
        _assert_close_scaled(gi["w_k"], ref.key_projs[i].weight.grad.numpy().T, f"d/d w_k[{i}]")
        _assert_close_scaled(gi["b_k"], ref.key_projs[i].bias.grad.numpy(), f"d/d b_k[{i}]")
        _assert_close_scaled(gi["norm_k"]["weight"], ref.norm1[i].weight.grad.numpy(),
                             f"d/d norm_k[{i}]")
        _assert_close_scaled(gi["norm_h"]["weight"], ref.norm2[i].weight.grad.numpy(),
                             f"d/d norm_h[{i}]")
    for i in range(s.nb):
        _assert_close_scaled(g["conv_norms"][i]["weight"],
                             ref.short_conv.norms[i].weight.grad.numpy(), f"d/d conv_norm[{i}]")
    _assert_close_scaled(g["conv_w"], ref.short_conv.conv.weight.grad.numpy()[:, 0, :].T,
                         "d/d conv_w")


@pytest.mark.parametrize("name", ["hc4_n3_h2", "hc4_shared_gate"])
def test_multi_branch_causality_of_both(name):
    s = _setup_hc(name)
    ids = s.hasher(s.tokens)[s.lid]
    y_ours = _run_ours(s, s.hidden, ids)
    y_ref = _run_ref_hc(s.ref, s.hidden, ids)
    rng = np.random.default_rng(0)
    for t0 in (0, s.case["T"] // 3, s.case["T"] - 1):
        tok2 = s.tokens.copy()
        tok2[:, t0] = (tok2[:, t0] + rng.integers(1, VOCAB, size=tok2.shape[0])) % VOCAB
        hid2 = s.hidden.copy()
        hid2[:, t0] += rng.standard_normal(hid2[:, t0].shape).astype(np.float32)
        ids2 = s.hasher(tok2)[s.lid]
        for changed_ids, changed_hidden in ((ids2, s.hidden), (ids, hid2)):
            z_ours = _run_ours(s, changed_hidden, changed_ids)
            z_ref = _run_ref_hc(s.ref, changed_hidden, changed_ids)
            np.testing.assert_allclose(z_ours, z_ref, rtol=RTOL, atol=ATOL)
            np.testing.assert_array_equal(z_ours[:, :t0], y_ours[:, :t0])
            np.testing.assert_array_equal(z_ref[:, :t0], y_ref[:, :t0])
            assert np.max(np.abs(z_ours[:, t0] - y_ours[:, t0])) > 1e-4
