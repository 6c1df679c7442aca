"""A scikit-learn ``IsolationForest`` compiled to flat numpy arrays, scored without scikit-learn.

Why
---
Risk scoring runs on the request path, where calling scikit-learn costs milliseconds of input
validation and joblib dispatch per row, and where unpickling a model would let whoever writes the
artifact run code in the server. :class:`CompiledForest` is built once, offline, from a fitted
``IsolationForest`` (:meth:`CompiledForest.from_sklearn`); it is shipped as a plain ``.npz`` archive
(:meth:`CompiledForest.to_bytes`) that is read back with ``allow_pickle=False`` and fully validated
(:meth:`CompiledForest.from_bytes`). Only numpy is needed to load and score it, and the scores equal
``IsolationForest.score_samples``.

Artifact layout
---------------
All trees' nodes are concatenated in scikit-learn's own order; ``tree_offsets[i]`` is the root of
tree ``i`` and ``tree_offsets[i + 1]`` the end of its nodes. Per node:

* ``left``, ``right`` (int32): absolute child indices, ``-1`` for leaves. Children always come after
  their parent inside their own tree; the loader relies on that to prove the structure is a forest
  (no cycles, every node reached exactly once, every root path ends in a leaf) with array checks.
* ``feature`` (int32): the split column as an index into the *full* input row, ``-1`` for leaves.
  With ``max_features < n_features`` every tree is trained on its own subset of the columns, so its
  local feature index is mapped through ``estimators_features_[i]``. When a tree sees all columns,
  scikit-learn neither trains nor scores on ``X[:, estimators_features_[i]]`` but on ``X`` itself, so
  the local index is already global and must *not* be mapped.
* ``threshold`` (float32): see "Thresholds" below.
* ``missing_left`` (bool): where scikit-learn sends a NaN at this split (learned even when training
  data had no NaN: the larger side), so NaN inputs score as they do in scikit-learn.
* ``depth`` (uint8, or uint16 for very deep trees) and ``n_node_samples`` (int32): leaf data, 0 on
  internal nodes. The float64 path-length contribution of each leaf is derived at load time, which
  keeps the artifact small and lets the loader check the stored depth against the structure.

A ``meta`` entry holds UTF-8 JSON (as a uint8 array, so no pickle is ever needed) with the format
name and version, ``n_features``, ``n_estimators``, ``max_samples`` and the model's ``offset_``.

Thresholds
----------
scikit-learn casts inputs to float32 and tests ``x <= t`` with ``t`` a float64. For a float32 ``x``
this equals ``x <= t32`` where ``t32`` is the largest float32 not above ``t``: if ``x <= t`` then
``x`` is one of the float32 values not above ``t``, so ``x <= t32``; conversely ``x <= t32 <= t``.
(NaN fails both.) ``t32`` is ``float32(t)`` unless that rounded up, then one float32 step down.

Arithmetic
----------
scikit-learn (``sklearn/ensemble/_iforest.py``, read in 1.9.1) counts depth from 1 at the root and adds,
per tree and in tree order, ``(depth + c(n_node_samples)) - 1.0`` to a float64 accumulator that
starts at 0.0; the score is ``-(2 ** -(total / (n_estimators * c(max_samples_))))``, with the ratio
forced to 1 (score -0.5) when the denominator is 0 (``max_samples_ == 1``). Floating-point addition is
not associative, so leaf values are computed in that same order, ``c`` uses the same expression, and
the per-tree values are summed sequentially (not with numpy's pairwise ``sum``) to land on the same
bits rather than merely close to them.

Scoring
-------
For the walk the loader renumbers nodes breadth-first across the whole forest so that every right
child sits right after its left child: one step for all trees at once is then
``node = first_child[node] + (x[feature[node]] > threshold[node])``. Leaves point to themselves with
a threshold of +inf, so after as many steps as the deepest leaf every walk has settled and no
per-tree or per-row Python loop is needed. ``score_one`` runs that step on a vector of one node per
tree; ``score_samples`` on a (trees x rows) matrix, in row chunks to bound memory. Inputs with NaN
take a slightly slower step that also consults ``missing_left``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

__all__ = ["FORMAT", "FORMAT_VERSION", "CompiledForest"]

FORMAT: Final = "posguard.compiled-isolation-forest"
FORMAT_VERSION: Final = 1

_LEAF: Final = -1
# (trees x rows) elements per step of the batch walk: temporaries of 512 KiB stay in cache; measured
# about twice as fast as 2 MiB ones.
_WALK_BUDGET: Final = 1 << 16
# Anything that numpy casts to float32 the way scikit-learn's check_array does; strings would parse.
_NUMERIC_KINDS: Final = "biuf"

_ARRAY_DTYPES: Final[Mapping[str, tuple[np.dtype[Any], ...]]] = {
    "tree_offsets": (np.dtype(np.int32),),
    "left": (np.dtype(np.int32),),
    "right": (np.dtype(np.int32),),
    "feature": (np.dtype(np.int32),),
    "threshold": (np.dtype(np.float32),),
    "missing_left": (np.dtype(np.bool_),),
    "depth": (np.dtype(np.uint8), np.dtype(np.uint16)),
    "n_node_samples": (np.dtype(np.int32),),
}
_META: Final = "meta"

Int32Array = npt.NDArray[np.int32]
IntpArray = npt.NDArray[np.intp]
Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _average_path_length(n_samples: npt.NDArray[np.integer[Any]]) -> Float64Array:
    """c(n): the mean path length of an unsuccessful search in a BST of n keys, as scikit-learn has it."""
    n = n_samples.astype(np.float64)
    out = np.zeros(n.shape, dtype=np.float64)
    out[n == 2] = 1.0
    big = n > 2
    m = n[big]
    # Same operations in the same order as scikit-learn, so the bits agree, not just the value.
    out[big] = 2.0 * (np.log(m - 1.0) + np.euler_gamma) - 2.0 * (m - 1.0) / m
    return out


def _largest_float32_at_most(t: Float64Array) -> Float32Array:
    """For each float64 t, the largest float32 ≤ t (NaN stays NaN)."""
    with np.errstate(over="ignore"):
        t32 = t.astype(np.float32)
    rounded_up = t32.astype(np.float64) > t
    t32[rounded_up] = np.nextafter(t32[rounded_up], np.float32(-np.inf))
    return t32


@dataclass(frozen=True, slots=True, eq=False)
class _Parts:
    """The artifact's content: what is serialised, before any validation."""

    n_features: int
    max_samples: int
    offset: float
    tree_offsets: Int32Array
    left: Int32Array
    right: Int32Array
    feature: Int32Array
    threshold: Float32Array
    missing_left: BoolArray
    depth: npt.NDArray[np.unsignedinteger[Any]]
    n_node_samples: Int32Array

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {name: getattr(self, name) for name in _ARRAY_DTYPES}

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features,
            "n_estimators": len(self.tree_offsets) - 1,
            "max_samples": self.max_samples,
            "offset": self.offset,
        }


def _bad(message: str) -> ValueError:
    return ValueError(f"invalid compiled forest: {message}")


def _strict_int(meta: Mapping[str, Any], key: str, minimum: int) -> int:
    value = meta.get(key)
    # bool is an int subclass; a true/false here means the metadata was not written by us.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(f"metadata {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_meta(raw: npt.NDArray[Any]) -> dict[str, Any]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _bad("metadata must be a 1-D uint8 array")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"metadata is not UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _bad("metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise _bad(f"not a {FORMAT} artifact (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(f"unsupported format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def _parts_from_arrays(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> _Parts:
    for name, dtypes in _ARRAY_DTYPES.items():
        array = arrays[name]
        if array.ndim != 1:
            raise _bad(f"{name!r} must be 1-D, got shape {array.shape}")
        if array.dtype not in dtypes:
            expected = " or ".join(str(d) for d in dtypes)
            raise _bad(f"{name!r} must have dtype {expected}, got {array.dtype}")
    offset = meta.get("offset")
    if not isinstance(offset, float) or not math.isfinite(offset):
        raise _bad(f"metadata 'offset' must be a finite number, got {offset!r}")
    n_estimators = _strict_int(meta, "n_estimators", 1)
    if len(arrays["tree_offsets"]) != n_estimators + 1:
        raise _bad(f"'tree_offsets' has {len(arrays['tree_offsets'])} entries for {n_estimators} trees")
    return _Parts(
        n_features=_strict_int(meta, "n_features", 1),
        max_samples=_strict_int(meta, "max_samples", 1),
        offset=offset,
        tree_offsets=arrays["tree_offsets"],
        left=arrays["left"],
        right=arrays["right"],
        feature=arrays["feature"],
        threshold=arrays["threshold"],
        missing_left=arrays["missing_left"],
        depth=arrays["depth"],
        n_node_samples=arrays["n_node_samples"],
    )


def _node_depths(parts: _Parts) -> IntpArray:
    """Depth of every node (roots 0), assuming the structure checks in _validate have passed."""
    n_nodes = len(parts.left)
    depth = np.zeros(n_nodes, dtype=np.intp)
    level = parts.tree_offsets[:-1].astype(np.intp)
    d = 0
    while level.size:
        depth[level] = d
        inner = level[parts.left[level] != _LEAF]
        level = np.concatenate([parts.left[inner], parts.right[inner]]).astype(np.intp)
        d += 1
    return depth


def _validate(parts: _Parts) -> None:
    """Raise ValueError unless parts describe a well-formed forest that the walk can trust."""
    n_nodes = len(parts.left)
    for name, array in parts.arrays().items():
        if name != "tree_offsets" and len(array) != n_nodes:
            raise _bad(f"{name!r} has {len(array)} entries, expected {n_nodes} (one per node)")
    if n_nodes >= np.iinfo(np.int32).max:
        raise _bad("too many nodes")

    offsets = parts.tree_offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_nodes or np.any(np.diff(offsets) < 1):
        raise _bad("'tree_offsets' must rise strictly from 0 to the number of nodes")

    leaf = parts.left == _LEAF
    inner = ~leaf
    if np.any(leaf != (parts.right == _LEAF)):
        raise _bad("a node has exactly one child")
    node = np.arange(n_nodes, dtype=np.int64)
    tree_end = np.repeat(offsets[1:], np.diff(offsets))
    for name, child in (("left", parts.left), ("right", parts.right)):
        c = child[inner].astype(np.int64)
        # Children strictly after the parent and inside its tree: paths only move forward, so no cycle.
        if np.any(c <= node[inner]) or np.any(c >= tree_end[inner]):
            raise _bad(f"a {name} child index is out of range (a child must follow its parent in its tree)")
    parents = np.bincount(np.concatenate([parts.left[inner], parts.right[inner]]), minlength=n_nodes)
    is_root = np.zeros(n_nodes, dtype=np.bool_)
    is_root[offsets[:-1]] = True
    # Roots have no parent, every other node exactly one: with forward-only edges that makes each tree
    # a proper binary tree in which every node is reachable from its root.
    if np.any(parents[is_root] != 0) or np.any(parents[~is_root] != 1):
        raise _bad("the nodes do not form one binary tree per root")

    if np.any(parts.feature[leaf] != _LEAF):
        raise _bad("a leaf has a split feature")
    if np.any(parts.feature[inner] < 0) or np.any(parts.feature[inner] >= parts.n_features):
        raise _bad(f"a split feature is out of range for {parts.n_features} features")
    if np.any(np.isnan(parts.threshold[inner])):
        raise _bad("a split threshold is NaN")

    if np.any(parts.n_node_samples[leaf] < 1) or np.any(parts.n_node_samples[inner] != 0):
        raise _bad("leaf sample counts must be >= 1 and internal nodes must store 0")
    expected_depth = _node_depths(parts)
    if np.any(parts.depth[leaf] != expected_depth[leaf]) or np.any(parts.depth[inner] != 0):
        raise _bad("stored leaf depths do not match the tree structure")


def _read_only(array: npt.NDArray[Any]) -> None:
    array.flags.writeable = False


class CompiledForest:
    """An immutable, pickle-free IsolationForest scorer that matches ``IsolationForest.score_samples``.

    Build with :meth:`from_sklearn` or :meth:`from_bytes`; the constructor is an implementation detail.
    Instances share no mutable state, so one can serve many threads at once.
    """

    __slots__ = (
        "_denominator",
        "_feature",
        "_first_child",
        "_leaf_value",
        "_missing_left",
        "_n_steps",
        "_parts",
        "_roots",
        "_threshold",
    )

    _parts: _Parts
    _roots: IntpArray
    _first_child: IntpArray
    _feature: IntpArray
    _threshold: Float32Array
    _missing_left: BoolArray
    _leaf_value: Float64Array
    _n_steps: int
    _denominator: float

    def __init__(self, parts: _Parts) -> None:
        _validate(parts)
        for array in parts.arrays().values():
            _read_only(array)
        set_ = object.__setattr__
        set_(self, "_parts", parts)

        n_trees = len(parts.tree_offsets) - 1
        n_nodes = len(parts.left)
        # Breadth-first over the whole forest, siblings adjacent: new_id[old] and the old ids in new order.
        new_id = np.empty(n_nodes, dtype=np.intp)
        order: list[IntpArray] = []
        level = parts.tree_offsets[:-1].astype(np.intp)
        start = 0
        n_steps = -1
        while level.size:
            new_id[level] = np.arange(start, start + level.size, dtype=np.intp)
            order.append(level)
            start += level.size
            n_steps += 1
            inner = level[parts.left[level] != _LEAF]
            pairs = np.empty(2 * inner.size, dtype=np.intp)
            pairs[0::2] = parts.left[inner]
            pairs[1::2] = parts.right[inner]
            level = pairs
        old = np.concatenate(order)

        leaf = parts.left[old] == _LEAF
        first_child = np.arange(n_nodes, dtype=np.intp)
        first_child[~leaf] = new_id[parts.left[old[~leaf]]]
        feature = np.where(leaf, 0, parts.feature[old]).astype(np.intp)
        # +inf: no float32 is above it and NaN compares false, so a walk that reached a leaf stays there.
        threshold = np.where(leaf, np.float32(np.inf), parts.threshold[old]).astype(np.float32)
        missing_left = np.where(leaf, True, parts.missing_left[old])

        depth = parts.depth[old].astype(np.float64)
        c = _average_path_length(parts.n_node_samples[old])
        # scikit-learn's depths start at 1 and it subtracts 1.0 after adding c; the detour changes rounding.
        leaf_value = np.where(leaf, ((depth + 1.0) + c) - 1.0, 0.0)

        denominator = float(n_trees * _average_path_length(np.array([parts.max_samples]))[0])

        for name, value in (
            ("_roots", np.arange(n_trees, dtype=np.intp)),
            ("_first_child", first_child),
            ("_feature", feature),
            ("_threshold", threshold),
            ("_missing_left", missing_left),
            ("_leaf_value", leaf_value),
        ):
            _read_only(value)
            set_(self, name, value)
        set_(self, "_n_steps", n_steps)
        set_(self, "_denominator", denominator)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_estimators={self.n_estimators}, n_features={self.n_features}, "
            f"max_samples={self.max_samples}, n_nodes={len(self._parts.left)})"
        )

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_sklearn(cls, model: IsolationForest) -> CompiledForest:
        """Compile a fitted ``IsolationForest`` (its arithmetic was matched against scikit-learn 1.9.1)."""
        # Imported here so that serving processes, which only load artifacts, never import scikit-learn.
        from sklearn.ensemble import IsolationForest

        if not isinstance(model, IsolationForest):
            raise TypeError(f"expected a fitted IsolationForest, got {type(model).__name__}")
        if not hasattr(model, "estimators_"):
            raise ValueError("the IsolationForest is not fitted")
        max_samples = int(model.max_samples_)
        # score_samples divides by c(_max_samples); make sure the public value is the one it uses.
        if int(getattr(model, "_max_samples", max_samples)) != max_samples:
            raise ValueError("the model's max_samples_ and _max_samples disagree")
        return cls.from_trees(
            model.estimators_,
            model.estimators_features_,
            n_features=int(model.n_features_in_),
            max_samples=max_samples,
            offset=float(model.offset_),
        )

    @classmethod
    def from_trees(
        cls,
        estimators: Sequence[Any],
        estimators_features: Sequence[npt.ArrayLike],
        *,
        n_features: int,
        max_samples: int,
        offset: float,
    ) -> CompiledForest:
        """Compile fitted isolation trees (``ExtraTreeRegressor``s) with the columns each was trained on.

        What :meth:`from_sklearn` does with an ``IsolationForest``'s ``estimators_`` and
        ``estimators_features_``, for trees fitted without the ensemble object around them.
        """
        sizes: list[int] = []
        per_node = [name for name in _ARRAY_DTYPES if name != "tree_offsets"]
        columns: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in per_node}
        base = 0
        for estimator, features in zip(estimators, estimators_features, strict=True):
            tree = estimator.tree_
            left = np.asarray(tree.children_left, dtype=np.int64)
            right = np.asarray(tree.children_right, dtype=np.int64)
            leaf = left == _LEAF
            local = np.asarray(tree.feature, dtype=np.int64)
            features = np.asarray(features, dtype=np.int64)
            # scikit-learn only slices the columns when a tree sees fewer than all of them (see module doc).
            global_feature = local if len(features) == n_features else features[np.where(leaf, 0, local)]
            depth = np.asarray(tree.compute_node_depths(), dtype=np.int64) - 1
            n_node_samples = np.asarray(tree.n_node_samples, dtype=np.int64)

            columns["left"].append(np.where(leaf, _LEAF, left + base))
            columns["right"].append(np.where(leaf, _LEAF, right + base))
            columns["feature"].append(np.where(leaf, _LEAF, global_feature))
            threshold = _largest_float32_at_most(np.asarray(tree.threshold, dtype=np.float64))
            columns["threshold"].append(np.where(leaf, np.float32(0), threshold))
            columns["missing_left"].append(np.asarray(tree.missing_go_to_left, dtype=np.bool_) & ~leaf)
            columns["depth"].append(np.where(leaf, depth, 0))
            columns["n_node_samples"].append(np.where(leaf, n_node_samples, 0))
            sizes.append(len(left))
            base += len(left)

        if not sizes:
            raise ValueError("the IsolationForest has no trees")
        all_depth = np.concatenate(columns["depth"])
        if all_depth.max() > np.iinfo(np.uint16).max:
            raise ValueError("trees deeper than 65535 levels are not supported")
        depth_dtype = np.uint8 if all_depth.max() <= np.iinfo(np.uint8).max else np.uint16
        if base >= np.iinfo(np.int32).max:
            raise ValueError("the forest has too many nodes for int32 indices")
        parts = _Parts(
            n_features=n_features,
            max_samples=max_samples,
            offset=offset,
            tree_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
            left=np.concatenate(columns["left"]).astype(np.int32),
            right=np.concatenate(columns["right"]).astype(np.int32),
            feature=np.concatenate(columns["feature"]).astype(np.int32),
            threshold=np.concatenate(columns["threshold"]).astype(np.float32),
            missing_left=np.concatenate(columns["missing_left"]).astype(np.bool_),
            depth=all_depth.astype(depth_dtype),
            n_node_samples=np.concatenate(columns["n_node_samples"]).astype(np.int32),
        )
        return cls(parts)

    def to_bytes(self) -> bytes:
        """The artifact: a compressed ``.npz`` of plain arrays, loadable with ``allow_pickle=False``."""
        meta = np.frombuffer(json.dumps(self._parts.meta(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        buffer = io.BytesIO()
        entries: dict[str, Any] = {_META: meta, **self._parts.arrays()}
        np.savez_compressed(buffer, **entries)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledForest:
        """Load and validate an artifact; any corrupt, truncated or foreign input raises ValueError."""
        expected = {_META, *_ARRAY_DTYPES}
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            # Whatever np.load trips over first (not a zip, a pickle it may not load, a cut-off header)
            # means the same thing to the caller.
            raise _bad(f"not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise _bad("not an .npz archive (a bare .npy array)")
        with archive:
            names = set(archive.files)
            if names != expected:
                raise _bad(f"archive holds {sorted(names)}, expected {sorted(expected)}")
            try:
                arrays = {name: archive[name] for name in sorted(expected)}
            except Exception as exc:
                # A damaged member fails in many ways (BadZipFile on a CRC mismatch, zlib.error, EOFError,
                # ValueError from the .npy header, MemoryError on a forged shape...): all mean "corrupt".
                raise _bad(f"corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc
        meta = _parse_meta(arrays.pop(_META))
        return cls(_parts_from_arrays(meta, arrays))

    # -- properties ---------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """Columns per input row."""
        return self._parts.n_features

    @property
    def n_estimators(self) -> int:
        """Number of trees."""
        return len(self._parts.tree_offsets) - 1

    @property
    def max_samples(self) -> int:
        """Training rows per tree (the model's ``max_samples_``), which sets the score's normaliser."""
        return self._parts.max_samples

    @property
    def offset(self) -> float:
        """The model's ``offset_``: scikit-learn's ``predict`` calls a row an outlier if score < offset."""
        return self._parts.offset

    # -- scoring ------------------------------------------------------------------------------------

    def _as_float32(self, x: npt.ArrayLike, ndim: int) -> Float32Array:
        array = np.asarray(x)
        if array.ndim != ndim:
            raise ValueError(f"expected a {ndim}-D array, got shape {array.shape}")
        if array.shape[-1] != self._parts.n_features:
            raise ValueError(f"expected {self._parts.n_features} features, got {array.shape[-1]}")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"expected numeric input, got dtype {array.dtype}")
        # Values beyond float32's range become ±inf, exactly as in scikit-learn, which merely warns.
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(array, dtype=np.float32)

    def _scores(self, total_depth: Float64Array) -> Float64Array:
        # scikit-learn leaves the ratio at 1 when c(max_samples) is 0 (max_samples == 1): score -0.5.
        zero = self._denominator == 0.0
        ratio = np.ones_like(total_depth) if zero else total_depth / self._denominator
        scores: Float64Array = -np.power(2.0, -ratio)
        return scores

    def score_one(self, x: npt.ArrayLike) -> float:
        """``score_samples`` of a single row of ``n_features`` values (the request path)."""
        row = self._as_float32(x, 1)
        node = self._roots
        first_child, feature, threshold = self._first_child, self._feature, self._threshold
        if np.isnan(row).any():
            missing_left = self._missing_left
            for _ in range(self._n_steps):
                value = row[feature[node]]
                go_left = (value <= threshold[node]) | (np.isnan(value) & missing_left[node])
                node = first_child[node] + ~go_left
        else:
            for _ in range(self._n_steps):
                node = first_child[node] + (row[feature[node]] > threshold[node])
        # cumsum adds left to right, tree by tree, like scikit-learn's accumulator.
        total: Float64Array = np.cumsum(self._leaf_value[node])[-1:]
        return float(self._scores(total)[0])

    def score_samples(self, X: npt.ArrayLike) -> Float64Array:  # noqa: N803 - scikit-learn's name
        """Equal to ``IsolationForest.score_samples(X)`` for a 2-D ``X``; lower is more anomalous."""
        rows = self._as_float32(X, 2)
        n_rows, n_features = rows.shape
        flat = rows.reshape(-1)
        has_nan = bool(np.isnan(flat).any())
        n_trees = self.n_estimators
        first_child, feature, threshold = self._first_child, self._feature, self._threshold
        out = np.empty(n_rows, dtype=np.float64)
        chunk = max(1, _WALK_BUDGET // n_trees)
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            row_base = (np.arange(start, stop, dtype=np.intp) * n_features)[np.newaxis, :]
            node = np.repeat(self._roots[:, np.newaxis], stop - start, axis=1)
            # np.take beats fancy indexing on these larger arrays (not on score_one's tiny ones).
            for _ in range(self._n_steps):
                value = np.take(flat, row_base + np.take(feature, node))
                if has_nan:
                    go_left = (value <= np.take(threshold, node)) | (
                        np.isnan(value) & np.take(self._missing_left, node)
                    )
                    node = np.take(first_child, node) + ~go_left
                else:
                    node = np.take(first_child, node) + (value > np.take(threshold, node))
            # Accumulating down the tree axis adds tree after tree, as scikit-learn does, hence the same bits.
            total = np.cumsum(np.take(self._leaf_value, node), axis=0)[-1]
            out[start:stop] = self._scores(total)
        return out
