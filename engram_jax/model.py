"""The hybrid LM: a pre-norm Transformer with MoE FFNs and Engram modules at chosen layers.

Input:    H = E[x], or with ``overencoding`` the average of E[x] and its hashed n-gram embeddings
          (layers/overencoding.py, the paper's OverEncoding baseline)
Block l:  H += Engram_l(H, hash ids)   (only at ``engram.layer_ids``; docs/paper.md section 1.6)
          H += Attention(RMSNorm(H))
          H += FFN_l(RMSNorm(H))        (dense SwiGLU for the first ``n_dense_layers``, else MoE)

With ``hc_mult = M > 1`` the residual stream is M branches H [B, T, M, D] (hyper-connections, Zhu
et al., arXiv 2409.19606; layers/hyperconn.py): H_0 = M copies of the input, the Engram module
adds its per-branch output Y [B, T, M, D] to the branches (layers/engram_branches.py, the paper's
backbone and the public demo), attention and FFN each read one mixed input through a
hyper-connection and write back to every branch, and the branches are summed before the final
norm. ``hc_mult = 1`` keeps the plain residual path above, operation for operation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import ModelConfig
from engram_jax.hashing import NgramHasher
from engram_jax.layers.attention import Attention
from engram_jax.layers.common import RMSNorm, SwiGLU, normal, project
from engram_jax.layers.engram import Engram
from engram_jax.layers.engram_branches import MultiBranchEngram
from engram_jax.layers.hyperconn import HyperConnection, collapse, expand
from engram_jax.layers.moe import MoE
from engram_jax.layers.overencoding import OverEncoding


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.layer_id = layer_id
        D = cfg.d_model
        has_engram = cfg.engram is not None and layer_id in cfg.engram.layer_ids
        self.n_branches = cfg.hc_mult
        if not has_engram:
            self.engram = None
        elif cfg.hc_mult == 1:
            self.engram = Engram(D, cfg.engram, layer_id, rngs=rngs)
        else:
            self.engram = MultiBranchEngram(D, cfg.engram, layer_id, cfg.hc_mult, rngs=rngs)
        self.attn_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.n_heads, n_layers=cfg.n_layers, rope_theta=cfg.rope_theta,
                              rngs=rngs, impl=cfg.attention)
        self.ffn_norm = RMSNorm(D, eps=cfg.norm_eps)
        if layer_id in cfg.moe_layer_ids:
            self.moe = MoE(D, cfg.moe, n_layers=cfg.n_layers, rngs=rngs)
            self.ffn = None
        else:
            self.moe = None
            self.ffn = SwiGLU(D, cfg.d_ff, n_layers=cfg.n_layers, rngs=rngs)
        if cfg.hc_mult > 1:  # no random draws: the sublayers' weights match hc_mult = 1's
            self.attn_hc = HyperConnection(D, cfg.hc_mult, 2 * layer_id, norm_eps=cfg.norm_eps)
            self.ffn_hc = HyperConnection(D, cfg.hc_mult, 2 * layer_id + 1, norm_eps=cfg.norm_eps)

    def __call__(self, h_BxTxD, hash_ids, memory=None):
        if self.n_branches > 1:
            return self._branches(h_BxTxD, hash_ids, memory)
        if self.engram is not None:
            h_BxTxD = h_BxTxD + self.engram(h_BxTxD, hash_ids, memory)
        h_BxTxD = h_BxTxD + self.attn(self.attn_norm(h_BxTxD))
        x = self.ffn_norm(h_BxTxD)
        if self.moe is None:
            return h_BxTxD + self.ffn(x), None, None
        y, load_E, aux = self.moe(x)
        return h_BxTxD + y, load_E, aux

    def _branches(self, H_BxTxMxD, hash_ids, memory):
        """The block on M branches [B, T, M, D] (hyper-connections at both residual sites)."""
        if self.engram is not None:
            H_BxTxMxD = H_BxTxMxD + self.engram(H_BxTxMxD, hash_ids, memory)
        x, carried, beta = self.attn_hc.width(H_BxTxMxD)
        H_BxTxMxD = self.attn_hc.depth(carried, self.attn(self.attn_norm(x)), beta)
        x, carried, beta = self.ffn_hc.width(H_BxTxMxD)
        x = self.ffn_norm(x)
        if self.moe is None:
            y, load_E, aux = self.ffn(x), None, None
        else:
            y, load_E, aux = self.moe(x)
        return self.ffn_hc.depth(carried, y, beta), load_E, aux


class HybridLM(nnx.Module):
    """Decoder-only LM. Live parameter count == ``cfg.param_counts()['total']``.

    Call: ``model(tokens_BxT, hash_ids={layer_id: int32 [B, T, G]})`` ->
    ``(logits [B, T, V] float32, aux)`` where aux holds ``load`` ([n_moe_layers, E] tokens routed
    to each expert, before capacity drops) and ``aux_loss`` (mean switch balance loss).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        """``remat="block"`` keeps only each block's input for the backward pass and recomputes
        the block there (``TrainConfig.remat``); "none" keeps every activation."""
        self.cfg = cfg
        if remat == "block" and cfg.hc_mult > 1 and cfg.engram is not None:
            # A block's state cannot be split and merged again inside the train step's
            # statistics capture when it holds lists of modules (the multi-branch Engram's gates
            # and norms): not supported yet.
            raise ValueError("remat='block' with hc_mult > 1 and Engram layers is not supported; "
                             "use remat='none' (or grad_accum to save memory)")
        self.remat = remat
        D, V = cfg.d_model, cfg.vocab_size
        self.embed = normal(rngs, (V, D), 1.0)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else normal(rngs, (D, V), D**-0.5)
        if cfg.overencoding is not None:
            # Drawn last, so the backbone's initial weights equal the plain model's of that seed.
            self.overencoding = OverEncoding(D, cfg.overencoding, V, rngs=rngs)

    def __call__(self, tokens_BxT: jax.Array, hash_ids: dict | None = None,
                 memory: dict | None = None):
        h, head, loads, auxes = self._trunk(tokens_BxT, hash_ids, memory)
        logits = project(h, head, preferred_element_type=jnp.float32)  # btd,dv->btv
        # the statistics after the head, as the model has always traced them
        return logits, _aux(loads, auxes)

    def hidden(self, tokens_BxT: jax.Array, hash_ids: dict | None = None,
               memory: dict | None = None):
        """The model up to the LM head: ``(h [B, T, D] after the final norm, the head [D, V] in
        the compute dtype, aux)``; ``__call__`` is ``project(h, head)`` in float32. A loss that
        never builds the full logits (``optim.chunked_cross_entropy``) starts from here."""
        h, head, loads, auxes = self._trunk(tokens_BxT, hash_ids, memory)
        return h, head, _aux(loads, auxes)

    def _trunk(self, tokens_BxT, hash_ids, memory):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        hash_ids = hash_ids or {}
        memory = memory or {}
        h = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
        if cfg.overencoding is not None:
            h = self.overencoding(tokens_BxT, h)
        if cfg.hc_mult > 1:
            h = expand(h, cfg.hc_mult)
        loads, auxes = [], []
        for blk in self.blocks:
            hid = hash_ids.get(blk.layer_id) if blk.engram is not None else None
            if blk.engram is not None and hid is None and blk.layer_id not in memory:
                raise ValueError(f"layer {blk.layer_id} has an Engram module but no hash ids were given")
            call = _remat_block if self.remat == "block" else _block
            h, load, aux = call(blk, h, hid, memory.get(blk.layer_id))
            if load is not None:
                loads.append(load)
                auxes.append(aux)
        if cfg.hc_mult > 1:
            h = collapse(h)
        h = self.final_norm(h)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return h, head.astype(dt), loads, auxes


def _aux(loads: list, auxes: list) -> dict:
    return {
        "load": jnp.stack(loads) if loads else jnp.zeros((0,), jnp.float32),
        "aux_loss": jnp.mean(jnp.stack(auxes)) if auxes else jnp.float32(0.0),
    }


def _block(blk: Block, h, hash_ids, memory):
    return blk(h, hash_ids, memory)


def _remat_block(blk: Block, h, hash_ids, memory):
    """``blk(h, hash_ids, memory)`` under ``jax.checkpoint``: only its inputs are kept for the
    backward pass, which runs the block again. Values the block sows (``nnx.Intermediate``)
    are carried out to it, as without rematerialisation."""
    graphdef, state = nnx.split(blk)

    def run(state, h, hash_ids, memory):
        b = nnx.merge(graphdef, state)
        return b(h, hash_ids, memory), nnx.state(b, nnx.Intermediate)

    out, sown = jax.checkpoint(run)(state, h, hash_ids, memory)
    nnx.update(blk, sown)
    return out


def count_params(model: nnx.Module) -> int:
    """Live trainable parameter count (nnx.Param leaves only; routing biases are not trained)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


def default_hash_fn(cfg: ModelConfig) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """Hashing without a tokenizer: identity compression, pad id 0 (tests and raw-id use)."""
    if cfg.engram is None:
        return lambda ids: {}
    e = cfg.engram
    hasher = NgramHasher(cfg.vocab_size, e.table_sizes, e.max_ngram, e.heads_per_ngram,
                         e.layer_ids, pad_id=0, seed=e.seed)
    return lambda ids: {k: v.astype(np.int32) for k, v in hasher(ids).items()}


def logits(model: HybridLM, token_ids: np.ndarray, hash_fn=None) -> jax.Array:
    """Logits [B, T, V] for numpy token ids [B, T]; hashes on the host.

    Args:
      hash_fn: maps token ids to ``{layer_id: hash ids [B, T, G]}``; default: no token compression
        (``default_hash_fn``). Training passes the pipeline's compressed hasher.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [B, T], got shape {ids.shape}")
    hash_fn = hash_fn or default_hash_fn(model.cfg)
    hash_ids = {k: jnp.asarray(v) for k, v in hash_fn(ids).items()}
    out, _ = model(jnp.asarray(ids, dtype=jnp.int32), hash_ids)
    return out
