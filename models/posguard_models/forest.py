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
Format version 2 (written by :meth:`CompiledForest.to_bytes`) is built to be small: there is one per
customer, so it stores no index, depth or per-node padding that the loader can derive. Each tree's nodes
are in pre-order (a node, then its whole left subtree, then its right subtree), trees one after another:

* ``tree_sizes``: nodes per tree.
* ``leaf_bits``: one flag per node, 1 for a leaf (``np.packbits``, most significant bit first, zero
  padding). In pre-order the flags alone fix the shape of a tree in which every node has zero or two
  children: node ``i``'s left child is ``i + 1`` and its right child starts where the left subtree ends.
  Counting +1 per internal node and -1 per leaf, a tree ends at the first node that takes the count to -1;
  the loader proves that each tree ends exactly at its last node, and finds a right child as the first
  node after its parent at which the count (taken before each node) is back to the parent's value, for
  all nodes at once with a stable sort of the counts.
* ``feature`` (one per internal node): the split column as an index into the *full* input row. With
  ``max_features < n_features`` every tree is trained on its own subset of the columns, so its local
  feature index is mapped through ``estimators_features_[i]``. When a tree sees all columns,
  scikit-learn neither trains nor scores on ``X[:, estimators_features_[i]]`` but on ``X`` itself, so
  the local index is already global and must *not* be mapped.
* ``threshold`` (float32, one per internal node): see "Thresholds" below.
* ``missing_flip_bits`` (one per internal node, bit-packed like ``leaf_bits``): where scikit-learn sends a
  NaN at this split, stored relative to the side with more training samples (left only if it has strictly
  more), which is where scikit-learn sends NaN when the node saw none in training: a bit is 1 where the
  side is the other one. Forests trained without NaN thus store all zeros, which compress to almost
  nothing, yet NaN inputs still score as they do in scikit-learn.
* ``leaf_samples`` (one per leaf): the leaf's ``n_node_samples``; the training samples of a subtree, and so
  the larger side above, are sums of these.

Integer columns use the smallest of uint8, uint16 and uint32 that holds the artifact's values (``feature``:
that holds ``n_features - 1``). Depths are not stored: the float64 path-length contribution of each leaf is
derived at load time. A ``meta`` entry holds UTF-8 JSON (as a uint8 array, so no pickle is ever needed)
with the format name and version, ``n_features``, ``n_estimators``, ``max_samples`` and the model's
``offset_``.

Before compression that is 5 bytes per internal node, 1 per leaf (2 once a leaf holds 256 samples) and
at most 2 bits per node, so the size is bounded by the node counts, whatever the compression achieves. A
customer forest (50 trees of ``max_samples`` 256, hence at most 8 levels: 255 internal nodes and 256 leaves
a tree) has at most 94 KB of columns even if every tree were full; real trees have a quarter to a third
of those nodes, and compressed artifacts are about 15 KB. (The thresholds of 50 full trees alone take
51,000 bytes, so no exact format can bound every customer model by a 50 KB budget; the tests hold
realistic and nearly full forests to it.)

Version 1, which databases still hold, is read too (and scores the same bits): all nodes in scikit-learn's
order, with per node ``left``/``right`` (int32 absolute child indices, -1 for leaves, children after their
parent within its tree), ``feature`` (int32, -1 on leaves), ``threshold`` (float32), ``missing_left``
(bool), ``depth`` (uint8/uint16) and ``n_node_samples`` (int32; both 0 on internal nodes), with
``tree_offsets`` (int32) where each tree starts. The loader checks it is a forest and converts it to the
version 2 content.

Thresholds
----------
scikit-learn casts inputs to float32 and tests ``x <= t`` with ``t`` a float64. For a float32 ``x``
this equals ``x <= t32`` where ``t32`` is the largest float32 not above ``t``: if ``x <= t`` then
``x`` is one of the float32 values not above ``t``, so ``x <= t32``; conversely ``x <= t32 <= t``.
(NaN fails both.) ``t32`` is ``float32(t)`` unless that rounded up, then one float32 step down.
scikit-learn's thresholds are finite, except NaN where a column held both NaN and an infinity in training
(the split then sends NaN one way and every number the other, which ``<=`` cannot express): compiling such
a forest fails, as it did in version 1, and the loader rejects any non-finite threshold.

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
take a slightly slower step that also consults ``missing_left``. Trees deeper than 64 levels are
rejected (an ``IsolationForest`` grows at most ``ceil(log2(max_samples))`` levels), which also bounds
the number of steps a forged artifact could impose on every request.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

__all__ = ["FORMAT", "FORMAT_VERSION", "CompiledForest"]

FORMAT: Final = "posguard.compiled-isolation-forest"
FORMAT_VERSION: Final = 2
# Still read: the version-1 artifacts already stored in databases.
_LINKED_VERSION: Final = 1

_LEAF: Final = -1
# An IsolationForest grows at most ceil(log2(max_samples)) levels, so 64 covers any data set; the bound keeps
# a forged artifact from imposing thousands of walk steps on every request.
_MAX_DEPTH: Final = 64
# (trees x rows) elements per step of the batch walk: temporaries of 512 KiB stay in cache; measured
# about twice as fast as 2 MiB ones.
_WALK_BUDGET: Final = 1 << 16
# Anything that numpy casts to float32 the way scikit-learn's check_array does; strings would parse.
_NUMERIC_KINDS: Final = "biuf"

_UNSIGNED: Final = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
_PACKED_BITS: Final = (np.dtype(np.uint8),)
# Format version 2: trees in pre-order, their shape implied by the leaf flags (module docstring).
_ARRAY_DTYPES: Final[Mapping[str, tuple[np.dtype[Any], ...]]] = {
    "tree_sizes": _UNSIGNED,
    "leaf_bits": _PACKED_BITS,
    "feature": _UNSIGNED,
    "threshold": (np.dtype(np.float32),),
    "missing_flip_bits": _PACKED_BITS,
    "leaf_samples": _UNSIGNED,
}
# Format version 1: every node in scikit-learn's order, linked by child indices.
_LINKED_ARRAY_DTYPES: Final[Mapping[str, tuple[np.dtype[Any], ...]]] = {
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
Int64Array = npt.NDArray[np.int64]
IntpArray = npt.NDArray[np.intp]
IntArray = npt.NDArray[np.integer[Any]]
UIntArray = npt.NDArray[np.unsignedinteger[Any]]
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


def _smallest_unsigned(largest: int) -> np.dtype[Any]:
    """The narrowest of uint8, uint16 and uint32 that holds 0 to ``largest``."""
    for dtype in _UNSIGNED:
        if largest <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{largest} does not fit in 32 bits")


@dataclass(frozen=True, slots=True, eq=False)
class _Parts:
    """Format version 2 content with its bit fields unpacked: what is serialised, before any validation.

    Trees follow one another, each in pre-order. ``is_leaf`` has an entry per node; ``feature``,
    ``threshold`` and ``missing_flipped`` one per internal node and ``leaf_samples`` one per leaf, in node
    order.
    """

    n_features: int
    max_samples: int
    offset: float
    tree_sizes: UIntArray
    is_leaf: BoolArray
    feature: UIntArray
    threshold: Float32Array
    missing_flipped: BoolArray
    leaf_samples: UIntArray

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
        return (
            self.tree_sizes,
            self.is_leaf,
            self.feature,
            self.threshold,
            self.missing_flipped,
            self.leaf_samples,
        )

    def serialised(self) -> dict[str, npt.NDArray[Any]]:
        return {
            "tree_sizes": self.tree_sizes,
            "leaf_bits": np.packbits(self.is_leaf),
            "feature": self.feature,
            "threshold": self.threshold,
            "missing_flip_bits": np.packbits(self.missing_flipped),
            "leaf_samples": self.leaf_samples,
        }

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features,
            "n_estimators": len(self.tree_sizes),
            "max_samples": self.max_samples,
            "offset": self.offset,
        }


@dataclass(frozen=True, slots=True, eq=False)
class _Linked:
    """Format version 1 content, which :meth:`CompiledForest.from_trees` gathers too.

    Nodes in scikit-learn's order, linked by absolute child indices; ``depth`` and ``n_node_samples`` are 0
    on internal nodes.
    """

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
        return {name: getattr(self, name) for name in _LINKED_ARRAY_DTYPES}


@dataclass(frozen=True, slots=True)
class _Header:
    """The metadata both versions share."""

    n_features: int
    n_estimators: int
    max_samples: int
    offset: float


def _bad(message: str) -> ValueError:
    return ValueError(f"invalid compiled forest: {message}")


# -- reading an artifact ------------------------------------------------------------------------------


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
    version = meta.get("format_version")
    # type() rather than isinstance: JSON true would otherwise pass for version 1.
    if type(version) is not int or version not in (_LINKED_VERSION, FORMAT_VERSION):
        raise _bad(f"unsupported format_version {version!r}, expected {_LINKED_VERSION} or {FORMAT_VERSION}")
    return meta


def _parse_header(meta: Mapping[str, Any]) -> _Header:
    offset = meta.get("offset")
    if not isinstance(offset, float) or not math.isfinite(offset):
        raise _bad(f"metadata 'offset' must be a finite number, got {offset!r}")
    return _Header(
        n_features=_strict_int(meta, "n_features", 1),
        n_estimators=_strict_int(meta, "n_estimators", 1),
        max_samples=_strict_int(meta, "max_samples", 1),
        offset=offset,
    )


def _check_dtypes(
    arrays: Mapping[str, npt.NDArray[Any]], spec: Mapping[str, tuple[np.dtype[Any], ...]]
) -> None:
    for name, dtypes in spec.items():
        array = arrays[name]
        if array.ndim != 1:
            raise _bad(f"{name!r} must be 1-D, got shape {array.shape}")
        if array.dtype not in dtypes:
            expected = " or ".join(str(d) for d in dtypes)
            raise _bad(f"{name!r} must have dtype {expected}, got {array.dtype}")


def _unpack_bits(name: str, packed: npt.NDArray[np.uint8], count: int) -> BoolArray:
    """``count`` flags from np.packbits output, which must be exactly as long as they need, padded with 0."""
    # Checked before unpacking, so a forged count can only fail here, never allocate its bits.
    if len(packed) != (count + 7) // 8:
        raise _bad(f"{name!r} has {len(packed)} bytes for {count} bits")
    bits = np.unpackbits(packed)
    if bits[count:].any():
        raise _bad(f"{name!r} has bits set after its {count} bits")
    return bits[:count].astype(np.bool_)


def _parts_from_arrays(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> _Parts:
    """Version 2 arrays, bit fields unpacked; the content itself is checked by _validate."""
    _check_dtypes(arrays, _ARRAY_DTYPES)
    header = _parse_header(meta)
    tree_sizes = arrays["tree_sizes"]
    if len(tree_sizes) != header.n_estimators:
        raise _bad(f"'tree_sizes' has {len(tree_sizes)} entries for {header.n_estimators} trees")
    is_leaf = _unpack_bits("leaf_bits", arrays["leaf_bits"], int(tree_sizes.sum(dtype=np.int64)))
    n_internal = len(is_leaf) - int(np.count_nonzero(is_leaf))
    return _Parts(
        n_features=header.n_features,
        max_samples=header.max_samples,
        offset=header.offset,
        tree_sizes=tree_sizes,
        is_leaf=is_leaf,
        feature=arrays["feature"],
        threshold=arrays["threshold"],
        missing_flipped=_unpack_bits("missing_flip_bits", arrays["missing_flip_bits"], n_internal),
        leaf_samples=arrays["leaf_samples"],
    )


def _linked_from_arrays(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> _Linked:
    _check_dtypes(arrays, _LINKED_ARRAY_DTYPES)
    header = _parse_header(meta)
    if len(arrays["tree_offsets"]) != header.n_estimators + 1:
        raise _bad(
            f"'tree_offsets' has {len(arrays['tree_offsets'])} entries for {header.n_estimators} trees"
        )
    return _Linked(
        n_features=header.n_features,
        max_samples=header.max_samples,
        offset=header.offset,
        tree_offsets=arrays["tree_offsets"],
        left=arrays["left"],
        right=arrays["right"],
        feature=arrays["feature"],
        threshold=arrays["threshold"],
        missing_left=arrays["missing_left"],
        depth=arrays["depth"],
        n_node_samples=arrays["n_node_samples"],
    )


def _read_members(archive: np.lib.npyio.NpzFile, names: Iterable[str]) -> dict[str, npt.NDArray[Any]]:
    try:
        return {name: archive[name] for name in names}
    except Exception as exc:
        # A damaged member fails in many ways (BadZipFile on a CRC mismatch, zlib.error, EOFError,
        # ValueError from the .npy header, MemoryError on a forged shape...): all mean "corrupt".
        raise _bad(f"corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc


# -- tree structure -----------------------------------------------------------------------------------


def _levels(left: IntArray, right: IntArray, roots: IntpArray) -> list[IntpArray]:
    """The nodes of a validated forest by depth, each level listing the children of the one above in
    (left, right) pairs, so a right child directly follows its sibling.

    Raises ValueError for a tree deeper than _MAX_DEPTH, which also bounds this loop.
    """
    levels: list[IntpArray] = []
    level = roots
    while level.size:
        if len(levels) > _MAX_DEPTH:
            raise _bad(f"a tree is deeper than {_MAX_DEPTH} levels, the most supported")
        levels.append(level)
        inner = level[left[level] != _LEAF]
        pairs = np.empty(2 * inner.size, dtype=np.intp)
        pairs[0::2] = left[inner]
        pairs[1::2] = right[inner]
        level = pairs
    return levels


def _leaf_sums(
    left: IntArray, right: IntArray, leaf_values: IntArray, levels: Sequence[IntpArray]
) -> Int64Array:
    """Per node, the sum of ``leaf_values`` over the leaves under it, bottom-up over the levels.

    ``leaf_values`` has an entry per node; those of internal nodes are ignored.
    """
    sums = leaf_values.astype(np.int64)
    for level in reversed(levels):
        inner = level[left[level] != _LEAF]
        sums[inner] = sums[left[inner]] + sums[right[inner]]
    return sums


def _check_tree_shapes(is_leaf: BoolArray, tree_sizes: Int64Array) -> None:
    """Raise unless each tree's leaf flags are the pre-order of a tree whose nodes have 0 or 2 children.

    A pre-order walk owes one subtree at the start (the tree); each node pays one and an internal node adds
    two (its children). With a count of +1 per internal node and -1 per leaf, what is owed after a node is
    the count + 1: the flags are such a tree exactly when something is still owed after every node but the
    last (count >= 0) and nothing after the last (count -1).
    """
    count = np.cumsum(np.where(is_leaf, -1, 1), dtype=np.int64)
    starts = np.cumsum(tree_sizes) - tree_sizes
    before_tree = np.concatenate([[0], count])[starts]
    relative = count - np.repeat(before_tree, tree_sizes)
    last = np.zeros(len(is_leaf), dtype=np.bool_)
    last[starts + tree_sizes - 1] = True
    if np.any(relative[last] != -1) or np.any(relative[~last] < 0):
        raise _bad("the leaf flags do not describe a tree of the given size in pre-order")


def _preorder_children(is_leaf: BoolArray) -> tuple[IntpArray, IntpArray]:
    """Left and right child of every node (-1 on leaves) of trees that passed _check_tree_shapes.

    With the running count of _check_tree_shapes taken *before* each node, an internal node's left child
    is the next node and its left subtree is complete when the count first comes back to the node's own
    value: that is where its right child starts. (The count before a tree's first node is one lower for each
    tree before it, and inside a tree the count stays at or above its value before the root, so the search
    never leaves the tree.)
    """
    n_nodes = len(is_leaf)
    before = np.zeros(n_nodes, dtype=np.int64)
    np.cumsum(np.where(is_leaf[:-1], -1, 1), out=before[1:])
    # Nodes grouped by count, in node order within a group: each node's successor in its group is the
    # next node with the same count.
    by_count = np.argsort(before, kind="stable")
    next_same = np.full(n_nodes, _LEAF, dtype=np.intp)
    same = before[by_count[1:]] == before[by_count[:-1]]
    next_same[by_count[:-1][same]] = by_count[1:][same]
    inner = np.flatnonzero(~is_leaf)
    left = np.full(n_nodes, _LEAF, dtype=np.intp)
    right = np.full(n_nodes, _LEAF, dtype=np.intp)
    left[inner] = inner + 1
    right[inner] = next_same[inner]
    return left, right


def _validate(parts: _Parts) -> None:
    """Raise ValueError unless parts describe a well-formed forest (tree depth is checked by _levels)."""
    n_nodes = len(parts.is_leaf)
    sizes = parts.tree_sizes.astype(np.int64)
    if not sizes.size or np.any(sizes < 1) or int(sizes.sum()) != n_nodes:
        raise _bad(f"'tree_sizes' must be >= 1 and add up to the number of nodes ({n_nodes})")
    if n_nodes >= np.iinfo(np.int32).max:
        raise _bad("too many nodes")
    _check_tree_shapes(parts.is_leaf, sizes)

    n_leaves = int(np.count_nonzero(parts.is_leaf))
    for name, array, expected, per in (
        ("feature", parts.feature, n_nodes - n_leaves, "internal node"),
        ("threshold", parts.threshold, n_nodes - n_leaves, "internal node"),
        ("missing_flip_bits", parts.missing_flipped, n_nodes - n_leaves, "internal node"),
        ("leaf_samples", parts.leaf_samples, n_leaves, "leaf"),
    ):
        if len(array) != expected:
            raise _bad(f"{name!r} has {len(array)} entries, expected {expected} (one per {per})")
    if np.any(parts.feature >= parts.n_features):
        raise _bad(f"a split feature is out of range for {parts.n_features} features")
    if not np.all(np.isfinite(parts.threshold)):
        raise _bad("a split threshold is not finite")
    if np.any(parts.leaf_samples < 1):
        raise _bad("a leaf sample count is 0")


def _validate_linked(linked: _Linked) -> list[IntpArray]:
    """Raise ValueError unless version 1 content is a well-formed forest; return its _levels."""
    n_nodes = len(linked.left)
    for name, array in linked.arrays().items():
        if name != "tree_offsets" and len(array) != n_nodes:
            raise _bad(f"{name!r} has {len(array)} entries, expected {n_nodes} (one per node)")
    if n_nodes >= np.iinfo(np.int32).max:
        raise _bad("too many nodes")

    offsets = linked.tree_offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_nodes or np.any(np.diff(offsets) < 1):
        raise _bad("'tree_offsets' must rise strictly from 0 to the number of nodes")

    leaf = linked.left == _LEAF
    inner = ~leaf
    if np.any(leaf != (linked.right == _LEAF)):
        raise _bad("a node has exactly one child")
    node = np.arange(n_nodes, dtype=np.int64)
    tree_end = np.repeat(offsets[1:], np.diff(offsets))
    for name, child in (("left", linked.left), ("right", linked.right)):
        c = child[inner].astype(np.int64)
        # Children strictly after the parent and inside its tree: paths only move forward, so no cycle.
        if np.any(c <= node[inner]) or np.any(c >= tree_end[inner]):
            raise _bad(f"a {name} child index is out of range (a child must follow its parent in its tree)")
    parents = np.bincount(np.concatenate([linked.left[inner], linked.right[inner]]), minlength=n_nodes)
    is_root = np.zeros(n_nodes, dtype=np.bool_)
    is_root[offsets[:-1]] = True
    # Roots have no parent, every other node exactly one: with forward-only edges that makes each tree
    # a proper binary tree in which every node is reachable from its root.
    if np.any(parents[is_root] != 0) or np.any(parents[~is_root] != 1):
        raise _bad("the nodes do not form one binary tree per root")

    if np.any(linked.feature[leaf] != _LEAF):
        raise _bad("a leaf has a split feature")
    if np.any(linked.feature[inner] < 0) or np.any(linked.feature[inner] >= linked.n_features):
        raise _bad(f"a split feature is out of range for {linked.n_features} features")
    if np.any(np.isnan(linked.threshold[inner])):
        raise _bad("a split threshold is NaN")

    if np.any(linked.n_node_samples[leaf] < 1) or np.any(linked.n_node_samples[inner] != 0):
        raise _bad("leaf sample counts must be >= 1 and internal nodes must store 0")
    levels = _levels(linked.left, linked.right, offsets[:-1].astype(np.intp))
    expected_depth = np.zeros(n_nodes, dtype=np.int64)
    for depth, level in enumerate(levels):
        expected_depth[level] = depth
    if np.any(linked.depth[leaf] != expected_depth[leaf]) or np.any(linked.depth[inner] != 0):
        raise _bad("stored leaf depths do not match the tree structure")
    return levels


def _to_preorder(linked: _Linked, levels: Sequence[IntpArray]) -> _Parts:
    """Validated version 1 content in version 2's layout, each tree re-ordered to pre-order.

    Positions go top-down: a left child comes right after its parent, a right child after the parent and
    the whole left subtree, whose size was summed bottom-up. Each tree keeps its block of node numbers.
    """
    left, right = linked.left, linked.right
    leaf = left == _LEAF
    # Every node has 0 or 2 children, so a subtree of k leaves has 2k - 1 nodes.
    size = 2 * _leaf_sums(left, right, np.ones(len(left), dtype=np.int64), levels) - 1
    position = np.empty(len(left), dtype=np.intp)
    position[levels[0]] = levels[0]
    for level in levels:
        inner = level[~leaf[level]]
        position[left[inner]] = position[inner] + 1
        position[right[inner]] = position[inner] + 1 + size[left[inner]]
    order = np.empty(len(left), dtype=np.intp)
    order[position] = np.arange(len(left), dtype=np.intp)

    is_leaf = leaf[order]
    inner = order[~is_leaf]
    samples = _leaf_sums(left, right, linked.n_node_samples, levels)
    left_is_larger = samples[left[inner]] > samples[right[inner]]
    tree_sizes = np.diff(linked.tree_offsets)
    feature = linked.feature[inner]
    leaf_samples = linked.n_node_samples[order[is_leaf]]
    return _Parts(
        n_features=linked.n_features,
        max_samples=linked.max_samples,
        offset=linked.offset,
        tree_sizes=tree_sizes.astype(_smallest_unsigned(int(tree_sizes.max()))),
        is_leaf=is_leaf,
        feature=feature.astype(_smallest_unsigned(linked.n_features - 1)),
        threshold=linked.threshold[inner],
        missing_flipped=linked.missing_left[inner] != left_is_larger,
        leaf_samples=leaf_samples.astype(_smallest_unsigned(int(leaf_samples.max()))),
    )


@dataclass(frozen=True, slots=True)
class _NodeColumns:
    """What the walk needs of every node, in pre-order; on leaves the values that keep a walk in place."""

    feature: IntpArray
    threshold: Float32Array
    missing_left: BoolArray
    samples: Int64Array  # training samples under the node

    @classmethod
    def of(
        cls, parts: _Parts, left: IntpArray, right: IntpArray, levels: Sequence[IntpArray]
    ) -> _NodeColumns:
        is_leaf = parts.is_leaf
        inner = ~is_leaf
        feature = np.zeros(len(is_leaf), dtype=np.intp)
        feature[inner] = parts.feature
        # +inf: no float32 is above it and NaN compares false, so a walk that reached a leaf stays there.
        threshold = np.full(len(is_leaf), np.inf, dtype=np.float32)
        threshold[inner] = parts.threshold
        samples = np.zeros(len(is_leaf), dtype=np.int64)
        samples[is_leaf] = parts.leaf_samples
        samples = _leaf_sums(left, right, samples, levels)
        # Stored as a flip of scikit-learn's default for a node that saw no NaN: the side with more samples.
        missing_left = np.ones(len(is_leaf), dtype=np.bool_)
        missing_left[inner] = parts.missing_flipped != (samples[left[inner]] > samples[right[inner]])
        return cls(feature, threshold, missing_left, samples)


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
        for array in parts.columns():
            _read_only(array)
        set_ = object.__setattr__
        set_(self, "_parts", parts)

        n_trees = len(parts.tree_sizes)
        left, right = _preorder_children(parts.is_leaf)
        sizes = parts.tree_sizes.astype(np.intp)
        levels = _levels(left, right, np.cumsum(sizes) - sizes)
        nodes = _NodeColumns.of(parts, left, right, levels)

        # Breadth-first over the whole forest, siblings adjacent: new_id[old] and the old (pre-order) ids in
        # new order.
        old = np.concatenate(levels)
        new_id = np.empty(len(old), dtype=np.intp)
        new_id[old] = np.arange(len(old), dtype=np.intp)
        leaf = parts.is_leaf[old]
        first_child = np.arange(len(old), dtype=np.intp)
        first_child[~leaf] = new_id[left[old[~leaf]]]

        depth = np.repeat(np.arange(len(levels), dtype=np.float64), [len(level) for level in levels])
        c = _average_path_length(nodes.samples[old])
        # scikit-learn's depths start at 1 and it subtracts 1.0 after adding c; the detour changes rounding.
        leaf_value = np.where(leaf, ((depth + 1.0) + c) - 1.0, 0.0)

        denominator = float(n_trees * _average_path_length(np.array([parts.max_samples]))[0])

        for name, value in (
            ("_roots", np.arange(n_trees, dtype=np.intp)),
            ("_first_child", first_child),
            ("_feature", nodes.feature[old]),
            ("_threshold", nodes.threshold[old]),
            ("_missing_left", nodes.missing_left[old]),
            ("_leaf_value", leaf_value),
        ):
            _read_only(value)
            set_(self, name, value)
        set_(self, "_n_steps", len(levels) - 1)
        set_(self, "_denominator", denominator)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_estimators={self.n_estimators}, n_features={self.n_features}, "
            f"max_samples={self.max_samples}, n_nodes={len(self._parts.is_leaf)})"
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
        per_node = [name for name in _LINKED_ARRAY_DTYPES if name != "tree_offsets"]
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
        if all_depth.max() > _MAX_DEPTH:
            raise ValueError(f"trees deeper than {_MAX_DEPTH} levels are not supported")
        if base >= np.iinfo(np.int32).max:
            raise ValueError("the forest has too many nodes for int32 indices")
        # Gathered in version 1's layout, so that compiling and loading version 1 share one conversion.
        linked = _Linked(
            n_features=n_features,
            max_samples=max_samples,
            offset=offset,
            tree_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
            left=np.concatenate(columns["left"]).astype(np.int32),
            right=np.concatenate(columns["right"]).astype(np.int32),
            feature=np.concatenate(columns["feature"]).astype(np.int32),
            threshold=np.concatenate(columns["threshold"]).astype(np.float32),
            missing_left=np.concatenate(columns["missing_left"]).astype(np.bool_),
            depth=all_depth.astype(np.uint8),
            n_node_samples=np.concatenate(columns["n_node_samples"]).astype(np.int32),
        )
        return cls._from_linked(linked)

    @classmethod
    def _from_linked(cls, linked: _Linked) -> CompiledForest:
        return cls(_to_preorder(linked, _validate_linked(linked)))

    def to_bytes(self) -> bytes:
        """The artifact (format version 2): a compressed ``.npz`` of plain arrays, loadable with
        ``allow_pickle=False``."""
        meta = np.frombuffer(json.dumps(self._parts.meta(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        buffer = io.BytesIO()
        entries: dict[str, Any] = {_META: meta, **self._parts.serialised()}
        np.savez_compressed(buffer, **entries)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledForest:
        """Load and validate an artifact of format version 2 or 1; any corrupt, truncated or foreign input
        raises ValueError."""
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
            if _META not in names:
                raise _bad(f"archive holds {sorted(names)}, without {_META!r}")
            meta = _parse_meta(_read_members(archive, [_META])[_META])
            linked = meta["format_version"] == _LINKED_VERSION
            spec = _LINKED_ARRAY_DTYPES if linked else _ARRAY_DTYPES
            expected = {_META, *spec}
            if names != expected:
                raise _bad(f"archive holds {sorted(names)}, expected {sorted(expected)}")
            arrays = _read_members(archive, spec)
        if linked:
            return cls._from_linked(_linked_from_arrays(meta, arrays))
        return cls(_parts_from_arrays(meta, arrays))

    # -- properties ---------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """Columns per input row."""
        return self._parts.n_features

    @property
    def n_estimators(self) -> int:
        """Number of trees."""
        return len(self._parts.tree_sizes)

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
        node = _walk_row(row, self)
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


class StackedForests:
    """Several compiled forests walked as one on a single row: each one's ``score_one``, bit for bit.

    A row's walk costs about the same number of numpy calls whatever the number of trees, so forests that
    score the same row, each over its own columns of it (the global model's core forest and its group
    forests), are walked in one pass instead of one pass each: on a lone score, about a third of the time.
    Each forest's trees stay together and in order, so its depths add up in the same order as in its own
    ``score_one``; walking past a shallower forest's leaves changes nothing (a leaf's threshold is +inf).
    """

    __slots__ = (
        "_bounds",
        "_feature",
        "_first_child",
        "_forests",
        "_leaf_value",
        "_missing_left",
        "_n_features",
        "_n_steps",
        "_roots",
        "_threshold",
    )

    _forests: tuple[CompiledForest, ...]
    _bounds: tuple[int, ...]  # where each forest's trees start in the walk, and where the last ends
    _roots: IntpArray
    _first_child: IntpArray
    _feature: IntpArray  # a column of the whole row
    _threshold: Float32Array
    _missing_left: BoolArray
    _leaf_value: Float64Array
    _n_steps: int
    _n_features: int

    def __init__(self, forests: Sequence[tuple[CompiledForest, Sequence[int]]]) -> None:
        """``forests``: each forest with the columns of the row it scores, in the forest's feature order."""
        if not forests:
            raise ValueError("no forests to stack")
        roots, first_child, feature, threshold, missing_left, leaf_value = [], [], [], [], [], []
        bounds = [0]
        offset = 0
        for forest, columns in forests:
            if len(columns) != forest.n_features:
                raise ValueError(f"a forest of {forest.n_features} features was given {len(columns)} columns")
            column_of = np.asarray(columns, dtype=np.intp)
            roots.append(forest._roots + offset)
            first_child.append(forest._first_child + offset)
            feature.append(column_of[forest._feature])
            threshold.append(forest._threshold)
            missing_left.append(forest._missing_left)
            leaf_value.append(forest._leaf_value)
            offset += len(forest._first_child)
            bounds.append(bounds[-1] + forest.n_estimators)
        set_ = object.__setattr__
        set_(self, "_forests", tuple(forest for forest, _ in forests))
        set_(self, "_bounds", tuple(bounds))
        for name, parts in (
            ("_roots", roots),
            ("_first_child", first_child),
            ("_feature", feature),
            ("_threshold", threshold),
            ("_missing_left", missing_left),
            ("_leaf_value", leaf_value),
        ):
            value = np.concatenate(parts)
            _read_only(value)
            set_(self, name, value)
        set_(self, "_n_steps", max(forest._n_steps for forest, _ in forests))
        set_(self, "_n_features", max(max(columns) for _, columns in forests) + 1)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def score_one(self, x: npt.ArrayLike) -> list[float]:
        """Each forest's ``score_one`` of its columns of the row ``x``, in the order they were given."""
        array = np.asarray(x)
        if array.ndim != 1 or len(array) < self._n_features:
            raise ValueError(f"expected a row of at least {self._n_features} values, got shape {array.shape}")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"expected numeric input, got dtype {array.dtype}")
        with np.errstate(over="ignore"):  # as CompiledForest._as_float32
            row = np.ascontiguousarray(array, dtype=np.float32)
        depths = self._leaf_value[_walk_row(row, self)]
        bounds = self._bounds
        scores = []
        for k, forest in enumerate(self._forests):
            total: Float64Array = np.cumsum(depths[bounds[k] : bounds[k + 1]])[-1:]
            scores.append(float(forest._scores(total)[0]))
        return scores


def _walk_row(row: Float32Array, nodes: CompiledForest | StackedForests) -> IntpArray:
    """The leaf each tree of ``nodes`` sends the float32 ``row`` to (one walk, a step per level)."""
    node = nodes._roots
    first_child, feature, threshold = nodes._first_child, nodes._feature, nodes._threshold
    if np.isnan(row).any():
        # For a value that is not NaN this is the other branch's step, so a row with a NaN anywhere (even in
        # columns another forest of a stack reads) may take it.
        missing_left = nodes._missing_left
        for _ in range(nodes._n_steps):
            value = row[feature[node]]
            go_left = (value <= threshold[node]) | (np.isnan(value) & missing_left[node])
            node = first_child[node] + ~go_left
    else:
        for _ in range(nodes._n_steps):
            node = first_child[node] + (row[feature[node]] > threshold[node])
    return node
