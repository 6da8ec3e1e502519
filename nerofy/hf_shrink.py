"""Fitting a shrunk transformers config under a parameter budget, from what its numbers mean.

``nerofy.hf.shrink_config`` caps the keys its rules know (hidden_size, num_layers, ...). Some configs
keep their size in keys no rule names (flaubert's ``emb_dim``, luke's entity vocabulary, per-stage
channel lists, efficientnet's ``width_coefficient``): the shrunk model stays far over the budget.
``fit_params`` then reads the model itself, built on the meta device:

1. *dims*: the sizes of the largest parameter tensors (weighted by how many parameters carry
   them) are matched against every int (and int-list entry) at any depth of the config and its
   sub-configs; the matching keys are divided, together, by a power of two chosen so that every
   smaller int of the same dict that divided the old value divides the new one (heads | hidden,
   patch or group sizes | widths).
2. *sensitivity*, where no dim matches or that no longer helps: each size value (everywhere it
   occurs) and each multiplier above 1 is halved alone, and the one whose halving drops the meta
   parameter count most is kept.

Repeated until the count is under the budget or nothing shrinks it further. Only ever shrinks;
what the keys mean is read from the numbers, never from a model's name. The rules are data:
``SKIP`` (keys never touched), ``FLOOR`` (smallest value written), ``MIN_DIM`` (a dim below it is
not worth shrinking)."""
from __future__ import annotations

import copy
import math
import re
from typing import Callable

# keys that name ids, rates, ratios, sampling and signal parameters: sizes are never read from them
SKIP = re.compile(r".*(_token_(id|index)s?|_token|_id|_ids|_idx|_index|eps|epsilon|dropout|_prob|_rate|rate|std"
                  r"|range|theta|_scale|scaling|sampling_rate|_length|hop_length|n_fft|win_length|seed|"
                  r"max_position_embeddings|max_.*positions|num_labels|patch_size|"
                  r"stride.*|kernel.*|.*kernel_size.*|.*padding.*|.*dilation.*|num_mel_bins|.*_bins)$")
MIN_DIM = 65       # a tensor dim at or below this is small already (the rules' widths are 32-64)
FLOOR = 16         # no value is divided below this
COVER = 0.8        # the largest tensors holding this share of the parameters give the dims
MAX_ROUNDS = 8
MAX_MULTIPLE = 8   # a dim may be this many times a config value
MAX_PROBES = 40    # numeric leaves halved one by one in a sensitivity round
_META = ("transformers_version", "_name_or_path", "architectures")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _leaves(d: dict, path=()):
    """(path, value) of every int, float and int list under ``d`` whose key may hold a size."""
    for k, v in d.items():
        if not isinstance(k, str) or k in ("id2label", "label2id") or k in _META:
            continue
        if isinstance(v, dict):
            yield from _leaves(v, path + (k,))
        elif SKIP.fullmatch(k):
            continue
        elif _is_int(v) or isinstance(v, float) or (isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v)):
            yield path + (k,), v


def _get(d: dict, path):
    for k in path:
        d = d[k]
    return d


def _set(d: dict, path, v) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = v


def _divisors(d: dict, path, v: int) -> list[int]:
    """The other ints of the dict holding ``path`` that divide ``v`` (heads, groups, patch sizes)."""
    parent = _get(d, path[:-1])
    out = []
    for k, u in parent.items():
        if k != path[-1] and _is_int(u) and 1 < u < v and v % u == 0:
            out.append(u)
    return out


def _divided(d: dict, path, v: int, f: int) -> int:
    """``v`` divided by the largest power of two <= ``f`` that keeps it >= FLOOR, an integer, and a
    multiple of what divided it before."""
    divs = _divisors(d, path, v)
    if v % 8 and v // f >= FLOOR:  # not a width (widths are multiples of 8): a count, say a vocabulary
        return v // f
    while f > 1:
        if v % f == 0 and v // f >= FLOOR and all((v // f) % u == 0 for u in divs):
            return v // f
        f //= 2
    return v


def heavy_dims(model) -> dict[int, int]:
    """dim size -> parameters in the largest tensors having that size (the tensors that together
    hold ``COVER`` of all parameters)."""
    params = sorted((p for p in model.parameters()), key=lambda p: p.numel(), reverse=True)
    total = sum(p.numel() for p in params) or 1
    seen = 0
    out: dict[int, int] = {}
    for p in params:
        if seen >= COVER * total:
            break
        seen += p.numel()
        for s in set(p.shape):
            if s >= MIN_DIM:
                out[s] = out.get(s, 0) + p.numel()
    return out


def _factor(n: int, limit: int) -> int:
    """How much to divide widths by this round: parameters grow about quadratically in width."""
    r = n / limit
    return min(8, 2 ** max(1, math.ceil(math.log2(math.sqrt(r)))))


def _by_dims(d: dict, dims: dict[int, int], f: int) -> dict | None:
    """``d`` with every size leaf equal to a heavy dim divided. The division is a function of the
    value: every leaf (int or list entry) holding it changes alike, so keys tied by an equal value
    (a stage's out_channels and the next one's in_channels) stay equal. None when nothing matches."""
    values = {x for _, v in _leaves(d) for x in ([v] if _is_int(v) else v if isinstance(v, (list, tuple)) else [])
              if _is_int(x)}
    # a dim no value equals may be a small multiple of one (n hash tables x vocabulary, expand x width)
    for s_ in [s_ for s_ in dims if s_ not in values]:
        for k in range(2, MAX_MULTIPLE + 1):
            if s_ % k == 0 and s_ // k in values and s_ // k >= MIN_DIM:
                dims = {**dims, s_ // k: dims[s_]}
                break
    new_of: dict[int, int] = {}
    for path, v in _leaves(d):
        for x in ([v] if _is_int(v) else v if isinstance(v, (list, tuple)) else []):
            if _is_int(x) and x in dims:
                w = _divided(d, path, x, f)
                new_of[x] = max(w, new_of.get(x, 0))  # the mildest division that suits every place
    new_of = {v: w for v, w in new_of.items() if w != v}
    if not new_of:
        return None
    new = copy.deepcopy(d)
    for path, v in _leaves(d):
        if _is_int(v) and v in new_of:
            _set(new, path, new_of[v])
        elif isinstance(v, (list, tuple)) and any(_is_int(x) and x in new_of for x in v):
            _set(new, path, type(v)(new_of.get(x, x) if _is_int(x) else x for x in v))
    return new


def fit_params(cls, config, limit: int, count: Callable, log: list | None = None, hard: int | None = None):
    """``config`` (already shrunk) with further size keys divided until ``count(cls, config)`` is at
    most ``limit``; returns ``(config, count)`` for the smallest config reached (the input where
    nothing shrinks it).
    Sensitivity rounds (a meta build per probe) run only while the count is over ``hard`` (default
    ``limit``). ``log`` collects (path, old, new) of each change kept."""
    hard = limit if hard is None else hard
    import torch

    ctype = type(config)
    best, n = config, count(cls, config)
    for _ in range(MAX_ROUNDS):
        if n <= limit:
            break
        d = best.to_dict()
        for k in _META:
            d.pop(k, None)
        with torch.device("meta"):
            dims = heavy_dims(cls(best))
        f = _factor(n, limit)
        cand = _by_dims(d, dims, f)
        got = _try(ctype, cls, cand, count) or _repair(ctype, cls, d, cand, f, count) if cand is not None else None
        if (got is None or got[1] >= n * 0.95) and n > hard:
            got = _most_sensitive(ctype, cls, d, n, count)
        if got is None or got[1] >= n:
            break
        if log is not None:
            new = got[0].to_dict()
            log += [(p, v, _get(new, p)) for p, v in _leaves(d) if _safe_get(new, p) != v]
        best, n = got
    return best, n


def _safe_get(d, path):
    try:
        return _get(d, path)
    except (KeyError, TypeError):
        return None


def _try(ctype, cls, d: dict, count):
    try:
        cfg = ctype.from_dict(copy.deepcopy(d))
        return cfg, count(cls, cfg)
    except Exception:  # noqa: BLE001 - the config class or the model refuses these values
        return None


def _repair(ctype, cls, d: dict, cand: dict, f: int, count):
    """The config class refuses ``cand`` (its validators tie a changed key to one left alone:
    hidden_size x expand == num_heads x head_dim): divide, by the same factor, one more int of a
    dict that changed, the first that makes the class accept it."""
    changed = {p[:-1] for p, v in _leaves(d) if _safe_get(cand, p) != v}
    for path, v in _leaves(d):
        if path[:-1] not in changed or not _is_int(v) or _get(cand, path) != v:
            continue
        g = f
        while g > 1:  # a count tied to a width (heads) may go below FLOOR, and need not keep divisors
            if v % g == 0 and v // g >= 2:
                new = copy.deepcopy(cand)
                _set(new, path, v // g)
                if (got := _try(ctype, cls, new, count)) is not None:
                    return got
            g //= 2
    return None


def _most_sensitive(ctype, cls, d: dict, n: int, count):
    """Each size value halved on its own (wherever it occurs, as in ``_by_dims``), and each
    multiplier above 1 (width/depth coefficients) halved toward 1: the one that drops the meta
    parameter count most."""
    cands = []
    for path, v in _leaves(d):
        if isinstance(v, float) and v > 1.0:
            new = copy.deepcopy(d)
            _set(new, path, max(1.0, v / 2))
            cands.append(new)
    values = sorted({x for _, v in _leaves(d) for x in ([v] if _is_int(v) else v if isinstance(v, (list, tuple)) else [])
                     if _is_int(x) and x >= 2 * FLOOR}, reverse=True)
    for x in values:
        if (new := _by_dims(d, {x: 1}, 2)) is not None:
            cands.append(new)
    best = None
    for new in cands[:MAX_PROBES]:
        got = _try(ctype, cls, new, count)
        if got is not None and got[1] < n and (best is None or got[1] < best[1]):
            best = got
    return best
