"""Building blocks of the U-curve fit: a monotone-vs-valley shape test and candidate shapes.

Everything here works on the per-x means of a grid (shape [n], weights w = runs per x over the
noise variance), vectorised over a batch of mean vectors [B, n] so that a bootstrap is a few
array operations rather than B optimiser runs.

* Shape test. The null hypothesis is "the curve is monotone over the grid" (flat included). The
  statistic is T = min(RSS_increasing, RSS_decreasing) - RSS_valley, the drop in weighted RSS
  when a valley (non-increasing, then non-decreasing) is allowed instead of the best monotone
  fit, all three by isotonic regression. Under the null T is largest when the curve is flat over
  part of the grid and steep elsewhere; its critical value is simulated for exactly that least
  favourable case (flat over the last K points, K = 2..n, at either end, the pure-error
  variance estimated with its degrees of freedom) and the maximum over K is used.
* Candidate shapes, each ``L* + a (x*-x)_+^p + b (x-x*)_+^q`` with a, b >= 0 on a grid of x* over
  the data range: the vertex parabola (p = q = 2, a = b; 3 parameters), the two-sided parabola
  (p = q = 2; 4 parameters) and the two-sided power form (p, q from :data:`EXPONENTS`; 6
  parameters). With x* and the exponents fixed the model is linear in (L*, a, b), so each
  candidate is solved exactly by enumerating the non-negativity active sets.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

EXPONENTS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
X_STEP = 0.005  # resolution of the x* grid (rho units)
SHAPES = ("parabola", "two-sided parabola", "two-sided power", "cubic", "quartic")
N_PARAMS = {"parabola": 3, "two-sided parabola": 4, "two-sided power": 6, "cubic": 4,
            "quartic": 5}
POLY_DEGREE = {"cubic": 3, "quartic": 4}


# ---------------------------------------------------------------- isotonic regression, batched
def _iso_rss(y_BN: np.ndarray, w_N: np.ndarray) -> np.ndarray:
    """Weighted RSS of the non-decreasing least-squares fit of each row of y; shape [B].

    Uses the min-max formula fit_i = max_{j<=i} min_{k>=i} mean(y[j..k]), exact and vectorised
    for the short grids (n <= ~20) an allocation sweep has.
    """
    n = y_BN.shape[1]
    if n <= 1:
        return np.zeros(y_BN.shape[0])
    cw = np.concatenate([[0.0], np.cumsum(w_N)])
    cy = np.concatenate([np.zeros((y_BN.shape[0], 1)), np.cumsum(y_BN * w_N, axis=1)], axis=1)
    j, k = np.triu_indices(n)
    av = np.full((y_BN.shape[0], n, n), np.inf)
    av[:, j, k] = (cy[:, k + 1] - cy[:, j]) / (cw[k + 1] - cw[j])
    m = np.minimum.accumulate(av[:, :, ::-1], axis=2)[:, :, ::-1]  # min over k >= i
    m = np.where(np.tril(np.ones((n, n), bool)).T, m, -np.inf)  # only j <= i
    fit = m.max(axis=1)
    return np.sum(w_N * (y_BN - fit) ** 2, axis=1)


def monotone_valley_rss(y_BN: np.ndarray, w_N: np.ndarray):
    """(RSS of the best non-decreasing, non-increasing and valley fits), each of shape [B]."""
    inc = _iso_rss(y_BN, w_N)
    dec = _iso_rss(-y_BN, w_N)
    n = y_BN.shape[1]
    valley = np.minimum(inc, dec)
    for s in range(1, n):  # decreasing on [0, s), increasing on [s, n)
        valley = np.minimum(valley, _iso_rss(-y_BN[:, :s], w_N[:s])
                            + _iso_rss(y_BN[:, s:], w_N[s:]))
    return inc, dec, valley


def shape_statistic(y_BN: np.ndarray, w_N: np.ndarray) -> np.ndarray:
    """T = min(RSS_inc, RSS_dec) - RSS_valley (>= 0), shape [B]."""
    inc, dec, valley = monotone_valley_rss(y_BN, w_N)
    return np.maximum(np.minimum(inc, dec) - valley, 0.0)


@functools.lru_cache(maxsize=64)
def critical_value(w_key: tuple[float, ...], dof: int, alpha: float, n_sim: int = 20000) -> float:
    """Least-favourable (1 - alpha) quantile of T / s^2 under a monotone curve.

    Args:
        w_key: relative weights of the grid points (runs per x), in x order.
        dof: degrees of freedom of the variance estimate s^2 (0 or less: variance known).
        alpha: the test's size.
        n_sim: simulated draws per configuration (fixed seed, so the value is deterministic).
    """
    w = np.asarray(w_key, float)
    n = len(w)
    rng = np.random.default_rng(12345)
    e = rng.standard_normal((n_sim, n)) / np.sqrt(w)
    s2 = rng.chisquare(dof, n_sim) / dof if dof > 0 else np.ones(n_sim)
    worst = 0.0
    for k in range(2, n + 1):
        for flat in (slice(n - k, n), slice(0, k)):  # the flat run at the low end of the curve
            inc, dec, valley = monotone_valley_rss(e[:, flat], w[flat])
            if k == n:
                t = np.minimum(inc, dec) - valley
            else:  # the steep part fixes the direction: decreasing into a flat right end, etc.
                t = (dec if flat.start > 0 else inc) - valley
            worst = max(worst, float(np.quantile(t / s2, 1 - alpha)))
    return worst


# ---------------------------------------------------------------- candidate shapes
class ShapeBank:
    """Every (shape, x*, p, q) candidate on a grid, with its active-set projections.

    Args:
        x_N: the distinct grid points, sorted, shape [n].
        w_N: weights of the means (runs per x), shape [n].
    """

    def __init__(self, x_N: np.ndarray, w_N: np.ndarray):
        self.x, self.w = x_N, w_N
        lo, hi = float(x_N[0]), float(x_N[-1])
        self.centres = np.linspace(lo, hi, int(round((hi - lo) / X_STEP)) + 1)
        rows = []  # (shape index, x*, p, q, tied)
        for c in self.centres:
            rows.append((0, c, 2.0, 2.0, True))
            rows.append((1, c, 2.0, 2.0, False))
            rows += [(2, c, p, q, False) for p, q in itertools.product(EXPONENTS, EXPONENTS)]
        self.shape = np.array([r[0] for r in rows])
        self.xc = np.array([r[1] for r in rows])
        self.p = np.array([r[2] for r in rows])
        self.q = np.array([r[3] for r in rows])
        tied = np.array([r[4] for r in rows])
        left = np.clip(self.xc[:, None] - x_N[None, :], 0, None) ** self.p[:, None]  # [C, n]
        right = np.clip(x_N[None, :] - self.xc[:, None], 0, None) ** self.q[:, None]
        left_t = np.where(tied[:, None], left + right, left)
        right_t = np.where(tied[:, None], 0.0, right)
        sw = np.sqrt(w_N)
        # Active sets: (L*, a, b), (L*, a), (L*, b), (L*); a tied candidate uses a for both sides.
        self.sets = []
        for use_a, use_b in ((True, True), (True, False), (False, True), (False, False)):
            cols = [np.ones_like(left)] + [left_t] * use_a + [right_t] * use_b
            xw = np.stack(cols, axis=2) * sw[None, :, None]  # [C, n, k]
            ok = np.all(np.linalg.norm(xw, axis=1) > 1e-12, axis=1) & ~(tied & use_b)
            if use_a and use_b:  # two columns proportional (x* beyond every point on one side)
                ok &= np.linalg.matrix_rank(xw, tol=1e-10) == 3
            xw = np.where(ok[:, None, None], xw, np.eye(len(x_N), len(cols))[None])
            q_, r_ = np.linalg.qr(xw)
            k = len(cols)
            qt = np.ascontiguousarray(np.swapaxes(q_, 1, 2).reshape(-1, len(x_N)))  # [C*k, n]
            proj = np.linalg.inv(r_) @ np.swapaxes(q_, 1, 2)  # [C, k, n]: weighted y -> coefs
            self.sets.append((use_a, use_b, k, ok, qt, proj))
        self.left, self.right = left_t, right_t
        self.tied = tied
        # Polynomials (smooth, possibly asymmetric curves): weighted LS maps and the curve on
        # the x* grid, in a centred and scaled x so that the Vandermonde matrix is well posed.
        z = (x_N - x_N.mean()) / max(np.ptp(x_N), 1e-12)
        zc = (self.centres - x_N.mean()) / max(np.ptp(x_N), 1e-12)
        self.poly = {}
        for name, deg in POLY_DEGREE.items():
            if len(x_N) > deg + 1:
                v = np.vander(z, deg + 1) * sw[:, None]
                self.poly[name] = (np.linalg.pinv(v), np.vander(zc, deg + 1), v)

    def fit(self, m_BN: np.ndarray, s2: float, penalty: float, shapes=SHAPES):
        """Best candidate per row of m, chosen by RSS / s^2 + penalty * n_params.

        Returns:
            dict of arrays [B]: x_star, l_star, a, b, p, q, shape (index into SHAPES), rss,
            and ``profile`` [B, n_centres]: the chosen shape's RSS profiled over x*.
        """
        yw = m_BN * np.sqrt(self.w)  # [B, n]
        yy = np.sum(yw * yw, axis=1)
        nb, nc = len(m_BN), len(self.xc)
        best = np.full((nc, nb), np.inf)  # candidates major: contiguous row operations
        which = np.zeros((nc, nb), np.int8)
        for si, (use_a, use_b, k, ok, qt, proj) in enumerate(self.sets):
            g = (qt @ yw.T).reshape(nc, k, nb)  # [C, k, B]
            rss = yy[None, :] - np.einsum("ckb,ckb->cb", g, g)
            feas = np.broadcast_to(ok[:, None], (nc, nb))
            if k > 1:
                coefs = (proj[:, 1:].reshape(-1, len(self.x)) @ yw.T).reshape(nc, k - 1, nb)
                feas = feas & (coefs.min(axis=1) >= 0)
            better = feas & (rss < best - 1e-15)
            np.copyto(best, rss, where=better)
            np.copyto(which, si, where=better)
        best = np.ascontiguousarray(best.T)
        which = np.ascontiguousarray(which.T)
        best = np.maximum(best, 0.0)
        ncent = len(self.centres)
        rows = np.arange(nb)
        out = {k: np.zeros(nb) for k in ("x_star", "l_star", "a", "b", "p", "q", "rss")}
        out["shape"] = np.zeros(nb, int)
        out["profile"] = np.zeros((nb, ncent))
        out["curve"] = np.zeros((nb, ncent))
        out["crit"] = np.full((nb, len(SHAPES)), np.inf)
        crit_best = np.full(nb, np.inf)
        per = len(self.xc) // ncent  # candidates per centre: parabola, two-sided, powers...
        b3 = best.reshape(nb, ncent, per)
        blocks = {0: slice(0, 1), 1: slice(1, 2), 2: slice(2, per)}
        for si, name in enumerate(SHAPES):
            if name not in shapes or (si > 2 and name not in self.poly):
                continue
            if si <= 2:
                sub = b3[:, :, blocks[si]]
                prof = sub.min(axis=2)  # [B, n_centres]
                ic = np.argmin(prof, axis=1)
                ie = np.argmin(sub[rows, ic], axis=1)
                j = ic * per + blocks[si].start + ie
                r = prof[rows, ic]
                cb = self._coefs(yw, j, which[rows, j])
                vals = dict(x_star=self.xc[j], l_star=cb[:, 0], a=cb[:, 1],
                            b=np.where(self.tied[j], cb[:, 1], cb[:, 2]), p=self.p[j],
                            q=self.q[j], rss=r)
                curve = predict(self.centres, *(vals[k] for k in
                                                ("x_star", "l_star", "a", "b", "p", "q")))
            else:
                pinv, vc, v = self.poly[name]
                coef = yw @ pinv.T  # [B, deg+1]
                r = np.sum((yw - coef @ v.T) ** 2, axis=1)
                curve = coef @ vc.T  # [B, n_centres]
                ic = np.argmin(curve, axis=1)
                lmin = curve[rows, ic]
                prof = np.full((nb, ncent), np.nan)
                vals = dict(x_star=self.centres[ic], l_star=lmin, a=curve[:, 0] - lmin,
                            b=curve[:, -1] - lmin, p=np.full(nb, np.nan),
                            q=np.full(nb, np.nan), rss=r)
            crit = r / s2 + penalty * N_PARAMS[name]
            out["crit"][:, si] = crit
            take = crit < crit_best
            crit_best = np.where(take, crit, crit_best)
            out["profile"] = np.where(take[:, None], prof, out["profile"])
            if name == "two-sided power":
                out["profile_power"] = prof
            out["curve"] = np.where(take[:, None], curve, out["curve"])
            for key, val in vals.items():
                out[key] = np.where(take, val, out[key])
            out["shape"] = np.where(take, si, out["shape"])
        return out

    def _coefs(self, yw_BN, j_B, set_B) -> np.ndarray:
        """(L*, a, b) of candidate j under active set s for each row; [B, 3]."""
        out = np.zeros((len(j_B), 3))
        for si, (use_a, use_b, k, ok, qt, proj) in enumerate(self.sets):
            sel = np.flatnonzero(set_B == si)
            if not len(sel):
                continue
            beta = np.einsum("bkn,bn->bk", proj[j_B[sel]], yw_BN[sel])
            out[sel, 0] = beta[:, 0]
            i = 1
            if use_a:
                out[sel, 1] = beta[:, i]
                i += 1
            if use_b:
                out[sel, 2] = beta[:, i]
        return out


def predict(x, x_star, l_star, a, b, p, q) -> np.ndarray:
    """The fitted curve(s) at x: broadcasts params of shape [B] against x of shape [M] -> [B, M]."""
    x = np.asarray(x, float)[None, :]
    col = [np.asarray(v, float)[:, None] for v in (x_star, l_star, a, b, p, q)]
    xs, ls, a_, b_, p_, q_ = col
    return ls + a_ * np.clip(xs - x, 0, None) ** p_ + b_ * np.clip(x - xs, 0, None) ** q_
