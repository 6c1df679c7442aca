"""Format 2 of the CompiledForest artifact: the pre-order layout, its size, the rejection of damaged ones."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.ensemble import IsolationForest

from posguard_models.forest import FORMAT, CompiledForest, _largest_float32_at_most

from .test_forest import N_FEATURES, rewritten, sklearn_scores, training_data, v1_artifact, with_meta

ENTRIES = {"meta", "tree_sizes", "leaf_bits", "feature", "threshold", "missing_flip_bits", "leaf_samples"}
# The product's budget for one customer's model.
CUSTOMER_BUDGET = 50_000


def arrays_of(data: bytes) -> dict[str, npt.NDArray[Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def artifact(n_features: int, max_samples: int, **arrays: npt.NDArray[Any]) -> bytes:
    """A format-2 artifact written from scratch."""
    meta = {
        "format": FORMAT,
        "format_version": 2,
        "n_features": n_features,
        "n_estimators": len(arrays["tree_sizes"]),
        "max_samples": max_samples,
        "offset": -0.5,
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def preorder(tree: Any) -> list[int]:
    """Node ids of a scikit-learn tree in pre-order, by a plain walk (the reference for the layout)."""
    order: list[int] = []
    stack = [0]
    while stack:
        node = stack.pop()
        order.append(node)
        if tree.children_left[node] != -1:
            stack += [tree.children_right[node], tree.children_left[node]]
    return order


def fake_estimator(**tree: Any) -> SimpleNamespace:
    """What from_trees reads of a fitted ExtraTreeRegressor, from plain arrays."""
    depths = np.asarray(tree.pop("depths"))
    return SimpleNamespace(tree_=SimpleNamespace(compute_node_depths=lambda: depths, **tree))


@pytest.fixture(scope="module")
def model() -> IsolationForest:
    rng = np.random.default_rng(1)
    return IsolationForest(n_estimators=25, max_features=0.5, random_state=1).fit(training_data(rng, 400))


def test_nodes_are_stored_in_preorder_with_columns_per_internal_node_and_leaf(model: IsolationForest) -> None:
    arrays = arrays_of(CompiledForest.from_sklearn(model).to_bytes())
    assert set(arrays) == ENTRIES
    assert json.loads(arrays["meta"].tobytes())["format_version"] == 2
    assert arrays["tree_sizes"].dtype == np.uint16
    assert arrays["feature"].dtype == np.uint8
    assert arrays["leaf_samples"].dtype == np.uint8

    leaf, feature, threshold, samples = [], [], [], []
    for estimator, features in zip(model.estimators_, model.estimators_features_, strict=True):
        tree = estimator.tree_
        order = np.array(preorder(tree))
        is_leaf = tree.children_left[order] == -1
        inner = order[~is_leaf]
        leaf.append(is_leaf)
        columns = (
            tree.feature[inner] if len(features) == N_FEATURES else np.asarray(features)[tree.feature[inner]]
        )
        feature.append(columns)
        threshold.append(_largest_float32_at_most(tree.threshold[inner]))
        samples.append(tree.n_node_samples[order[is_leaf]])
    is_leaf = np.concatenate(leaf)
    assert arrays["tree_sizes"].tolist() == [e.tree_.node_count for e in model.estimators_]
    assert np.array_equal(np.unpackbits(arrays["leaf_bits"], count=len(is_leaf)).astype(bool), is_leaf)
    assert np.array_equal(arrays["feature"], np.concatenate(feature))
    assert np.array_equal(arrays["threshold"], np.concatenate(threshold))
    assert np.array_equal(arrays["leaf_samples"], np.concatenate(samples))
    # Trained without NaN, every split sends NaN to its larger side: nothing to flip.
    assert len(arrays["missing_flip_bits"]) == (np.count_nonzero(~is_leaf) + 7) // 8
    assert not arrays["missing_flip_bits"].any()


def relabelled(estimator: Any, rng: np.random.Generator) -> SimpleNamespace:
    """The same tree with its nodes numbered level by level, in random order within a level."""
    tree = estimator.tree_
    depths = tree.compute_node_depths()
    order = np.lexsort((rng.random(tree.node_count), depths))
    new_id = np.empty_like(order)
    new_id[order] = np.arange(len(order))

    def children(child: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
        return np.where(child == -1, -1, new_id[child])[order]

    return fake_estimator(
        children_left=children(tree.children_left),
        children_right=children(tree.children_right),
        feature=tree.feature[order],
        threshold=tree.threshold[order],
        missing_go_to_left=tree.missing_go_to_left[order],
        n_node_samples=tree.n_node_samples[order],
        depths=depths[order],
    )


def test_the_node_order_of_the_trees_compiled_does_not_matter(model: IsolationForest) -> None:
    # The layout is computed from the links, not taken from scikit-learn's numbering (pre-order today).
    rng = np.random.default_rng(2)
    shuffled = [relabelled(estimator, rng) for estimator in model.estimators_]
    assert any(preorder(e.tree_) != list(range(e.tree_.children_left.size)) for e in shuffled)
    forest = CompiledForest.from_trees(
        shuffled,
        model.estimators_features_,
        n_features=N_FEATURES,
        max_samples=int(model.max_samples_),
        offset=float(model.offset_),
    )
    assert forest.to_bytes() == CompiledForest.from_sklearn(model).to_bytes()


def test_nan_routing_survives_the_round_trip_when_training_saw_nan() -> None:
    rng = np.random.default_rng(6)
    train = training_data(rng, 500)
    train[rng.random(train.shape) < 0.1] = np.nan
    model = IsolationForest(n_estimators=30, random_state=6).fit(train)
    data = CompiledForest.from_sklearn(model).to_bytes()
    # Nodes that saw NaN drew its side at random, so some differ from the larger side.
    assert arrays_of(data)["missing_flip_bits"].any()
    probe = training_data(rng, 300)
    probe[rng.random(probe.shape) < 0.3] = np.nan
    assert np.array_equal(CompiledForest.from_bytes(data).score_samples(probe), sklearn_scores(model, probe))


def test_integer_columns_take_the_narrowest_dtype_that_fits() -> None:
    rng = np.random.default_rng(4)
    data = training_data(rng, 400)

    def dtypes(rows: npt.NDArray[np.float64], max_samples: int) -> tuple[np.dtype[Any], ...]:
        model = IsolationForest(n_estimators=5, max_samples=max_samples, random_state=0).fit(rows)
        data = CompiledForest.from_sklearn(model).to_bytes()
        probe = rows[:50]
        assert np.array_equal(
            CompiledForest.from_bytes(data).score_samples(probe), sklearn_scores(model, probe)
        )
        arrays = arrays_of(data)
        return arrays["tree_sizes"].dtype, arrays["feature"].dtype, arrays["leaf_samples"].dtype

    u8, u16, u32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)
    assert dtypes(data, 1) == (u8, u8, u8)
    assert dtypes(digit_data(rng), 256) == (u16, u8, u8)
    # Identical rows: every tree is a single leaf holding all 300 samples.
    assert dtypes(np.repeat(data[:1], 300, axis=0), 300) == (u8, u8, u16)
    assert dtypes(rng.normal(size=(300, 300)), 64) == (u8, u16, u8)

    single_leaf = fake_estimator(
        children_left=np.array([-1]),
        children_right=np.array([-1]),
        feature=np.array([-2]),
        threshold=np.array([-2.0]),
        missing_go_to_left=np.array([0], dtype=np.uint8),
        n_node_samples=np.array([70_000]),
        depths=np.array([1]),
    )
    huge = CompiledForest.from_trees(
        [single_leaf], [np.arange(2)], n_features=2, max_samples=70_000, offset=-0.5
    ).to_bytes()
    assert arrays_of(huge)["leaf_samples"].dtype == u32
    assert CompiledForest.from_bytes(huge).score_one(np.zeros(2)) == CompiledForest.from_bytes(
        huge
    ).score_one(np.ones(2))


def digit_data(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """256 distinct rows on which random splits almost always halve a node: the fullest trees there are.

    Row i's 8 bits become 4 columns of 2 far-apart binary digits each; a threshold drawn uniformly between a
    node's extremes then falls in the gap between two equal halves with near certainty.
    """
    bits = (np.arange(256)[:, np.newaxis] >> np.arange(8)) & 1
    rows = bits[:, 0::2] * 1.0 + bits[:, 1::2] * 1e-3
    return rows[rng.permutation(256)] * rng.lognormal(size=4) + rng.normal(size=4)


@pytest.mark.parametrize("data", ["uniform", "digits"])
def test_customer_forests_fit_the_budget_even_with_the_fullest_trees(data: str) -> None:
    # A customer model: 50 trees of max_samples 256 on 4 columns. 256 distinct rows give the fullest trees;
    # uniform rows about 105 internal nodes a tree, the digit rows almost all 255 of a full tree of depth 8.
    rng = np.random.default_rng(12)
    rows = rng.random((256, 4)) if data == "uniform" else digit_data(rng)
    model = IsolationForest(n_estimators=50, max_samples=256, random_state=12).fit(rows)
    n_internal = sum(int(np.count_nonzero(e.tree_.children_left != -1)) for e in model.estimators_)
    assert n_internal > (12_700 if data == "digits" else 5_000)
    size = len(CompiledForest.from_sklearn(model).to_bytes())
    assert size <= CUSTOMER_BUDGET
    assert len(v1_artifact(model)) > 2 * size


def full_tree(rng: np.random.Generator, depth: int, n_features: int) -> SimpleNamespace:
    """A full tree of the given depth in heap order (children of k at 2k + 1, 2k + 2), a sample a leaf."""
    n_nodes = 2 ** (depth + 1) - 1
    node = np.arange(n_nodes)
    inner = node < n_nodes // 2
    level = np.floor(np.log2(node + 1)).astype(np.intp)
    return fake_estimator(
        children_left=np.where(inner, 2 * node + 1, -1),
        children_right=np.where(inner, 2 * node + 2, -1),
        feature=np.where(inner, rng.integers(0, n_features, n_nodes), -2),
        threshold=np.where(inner, rng.normal(size=n_nodes) * 10.0 ** rng.integers(-3, 4, n_nodes), -2.0),
        missing_go_to_left=np.zeros(n_nodes, dtype=np.uint8),
        n_node_samples=2 ** (depth - level),
        depths=level + 1,
    )


def test_full_depth_8_trees_bound_a_customer_artifact() -> None:
    # The worst case by construction: 50 full trees of depth 8, 255 splits and 256 leaves each. Before
    # compression that is 5 bytes a split, 1 a leaf and 2 bits a node; deflate adds next to nothing even to
    # data it cannot shrink, so this bounds any customer artifact whatever its data.
    rng = np.random.default_rng(13)
    trees = [full_tree(rng, 8, 4) for _ in range(50)]
    forest = CompiledForest.from_trees(trees, [np.arange(4)] * 50, n_features=4, max_samples=256, offset=-0.5)
    data = forest.to_bytes()
    arrays = arrays_of(data)
    columns = sum(array.nbytes for name, array in arrays.items() if name != "meta")
    assert columns == 50 * (255 * 5 + 256) + (50 * 511 + 7) // 8 + (50 * 255 + 7) // 8 + 2 * 50
    assert len(data) <= columns + 1_500
    loaded = CompiledForest.from_bytes(data)
    probe = rng.normal(size=(200, 4))
    assert np.array_equal(loaded.score_samples(probe), forest.score_samples(probe))
    assert loaded._n_steps == 8


def caterpillar(depth: int) -> dict[str, npt.NDArray[Any]]:
    """Format-2 columns of one tree whose every split has a leaf on the left: ``depth`` splits deep."""
    is_leaf = np.ones(2 * depth + 1, dtype=np.bool_)
    is_leaf[0:-1:2] = False
    return {
        "tree_sizes": np.array([2 * depth + 1], dtype=np.uint16),
        "leaf_bits": np.packbits(is_leaf),
        "feature": np.zeros(depth, dtype=np.uint8),
        "threshold": np.arange(depth, dtype=np.float32),
        "missing_flip_bits": np.packbits(np.zeros(depth, dtype=np.bool_)),
        "leaf_samples": np.ones(depth + 1, dtype=np.uint8),
    }


def test_trees_deeper_than_64_levels_are_rejected() -> None:
    deepest = CompiledForest.from_bytes(artifact(1, 256, **caterpillar(64)))
    # x = 9.5 passes the splits at 0..9 and is isolated by the one at 10, in a leaf at depth 11.
    c_256 = 2.0 * (np.log(255.0) + np.euler_gamma) - 2.0 * 255.0 / 256.0
    for x, depth in ((-1.0, 1), (9.5, 11), (1e9, 64)):
        assert deepest.score_one([x]) == pytest.approx(-(2.0 ** -(depth / c_256)), rel=1e-12)
    with pytest.raises(ValueError, match="deeper than 64 levels"):
        CompiledForest.from_bytes(artifact(1, 256, **caterpillar(65)))

    # The same tree as scikit-learn would hand it over.
    columns = caterpillar(65)
    is_leaf = np.unpackbits(columns["leaf_bits"], count=131).astype(bool)
    node = np.arange(131)
    too_deep = fake_estimator(
        children_left=np.where(is_leaf, -1, node + 1),
        children_right=np.where(is_leaf, -1, node + 2),
        feature=np.where(is_leaf, -2, 0),
        threshold=np.where(is_leaf, -2.0, node // 2),
        missing_go_to_left=np.zeros(131, dtype=np.uint8),
        n_node_samples=np.where(is_leaf, 1, 66 - node // 2),
        depths=node // 2 + 1 + (is_leaf & (node < 130)),
        node_count=131,
    )
    with pytest.raises(ValueError, match="deeper than 64 levels are not supported"):
        CompiledForest.from_trees([too_deep], [np.arange(1)], n_features=1, max_samples=256, offset=-0.5)
    # Nor may a format-1 artifact hold one.
    old_model = SimpleNamespace(
        n_features_in_=1,
        estimators_=[too_deep],
        estimators_features_=[np.arange(1)],
        max_samples_=256,
        offset_=-0.5,
    )
    with pytest.raises(ValueError, match="deeper than 64 levels, the most supported"):
        CompiledForest.from_bytes(v1_artifact(old_model))


def test_damaged_version_2_artifacts_raise_value_error(model: IsolationForest) -> None:
    data = CompiledForest.from_sklearn(model).to_bytes()
    arrays = arrays_of(data)
    sizes, leaf_bits, feature = arrays["tree_sizes"], arrays["leaf_bits"], arrays["feature"]
    threshold, flips, samples = arrays["threshold"], arrays["missing_flip_bits"], arrays["leaf_samples"]
    n_nodes = int(sizes.sum())
    is_leaf = np.unpackbits(leaf_bits, count=n_nodes).astype(bool)
    assert n_nodes % 8, "the fixture should leave padding bits in 'leaf_bits'"

    def patched(array: npt.NDArray[Any], index: int, value: Any) -> npt.NDArray[Any]:
        copy = array.copy()
        copy[index] = value
        return copy

    def with_flags(flags: npt.NDArray[np.bool_]) -> bytes:
        return rewritten(data, leaf_bits=np.packbits(flags))

    root_swapped = is_leaf.copy()
    root_swapped[[0, int(sizes[0]) - 1]] = root_swapped[[int(sizes[0]) - 1, 0]]
    moved = sizes.copy()
    moved[0] -= 2
    moved[1] += 2
    cases = {
        # Leaf flags that are no tree: a leaf for a root, a tree boundary in the middle of a tree.
        "do not describe a tree": with_flags(root_swapped),
        "do not describe a tree of": rewritten(data, tree_sizes=moved),
        "must be >= 1": rewritten(
            data, tree_sizes=np.concatenate([[0], sizes[1:-1], sizes[-1:] + sizes[0]]).astype(sizes.dtype)
        ),
        "'tree_sizes' has": rewritten(data, tree_sizes=sizes[:-1]),
        # Lengths that do not match the flags.
        "'leaf_bits' has": rewritten(data, leaf_bits=leaf_bits[:-1]),
        "'missing_flip_bits' has": rewritten(data, missing_flip_bits=np.append(flips, np.uint8(0))),
        "bits set after": rewritten(data, leaf_bits=patched(leaf_bits, -1, leaf_bits[-1] | 1)),
        "'feature' has": rewritten(data, feature=feature[:-1]),
        "'threshold' has": rewritten(data, threshold=np.append(threshold, np.float32(1))),
        "'leaf_samples' has": rewritten(data, leaf_samples=samples[1:]),
        # A forged size must not make the loader allocate its bits.
        "bytes for": rewritten(data, tree_sizes=np.full(len(sizes), 2**32 - 1, dtype=np.uint32)),
        # Values.
        "feature is out of range": rewritten(data, feature=patched(feature, 3, N_FEATURES)),
        "not finite": rewritten(data, threshold=patched(threshold, 0, np.nan)),
        "is not finite": rewritten(data, threshold=patched(threshold, 5, np.inf)),
        "threshold is not finite": rewritten(data, threshold=patched(threshold, -1, -np.inf)),
        "sample count is 0": rewritten(data, leaf_samples=patched(samples, 7, 0)),
        # Types, shapes, entries, metadata.
        "must have dtype": rewritten(data, feature=feature.astype(np.int8)),
        "dtype float32": rewritten(data, threshold=threshold.astype(np.float64)),
        "dtype uint8": rewritten(data, leaf_bits=is_leaf),
        "uint32, got int64": rewritten(data, tree_sizes=sizes.astype(np.int64)),
        "1-D": rewritten(data, leaf_samples=samples[:, np.newaxis]),
        "expected": rewritten(data, missing_flip_bits=None),
        "archive holds": rewritten(data, left=np.zeros(3, dtype=np.int32)),
        "without 'meta'": rewritten(data, meta=None),
        "format_version": with_meta(data, format_version=3),
        "unsupported format_version '2'": with_meta(data, format_version="2"),
        "n_estimators": with_meta(data, n_estimators=0),
        "entries for": with_meta(data, n_estimators=len(sizes) + 1),
        "max_samples": with_meta(data, max_samples=1.5),
    }
    for message, damaged in cases.items():
        with pytest.raises(ValueError, match=message):
            CompiledForest.from_bytes(damaged)


def test_randomly_damaged_columns_raise_only_value_error(model: IsolationForest) -> None:
    # Whatever the columns hold, loading ends in a forest or a ValueError: never an IndexError, a
    # MemoryError or a hang. Columns are re-saved intact, so it is the loader's checks that are tested.
    data = CompiledForest.from_sklearn(model).to_bytes()
    arrays = {name: value for name, value in arrays_of(data).items() if name != "meta"}
    rng = np.random.default_rng(7)
    loaded, rejections = 0, []
    for _ in range(300):
        name = str(rng.choice(sorted(arrays)))
        raw = arrays[name].view(np.uint8).copy()
        change = rng.integers(3)
        if change == 0:  # flip random bits
            positions = rng.integers(0, len(raw), size=rng.integers(1, 4))
            raw[positions] ^= rng.integers(1, 256, size=len(positions)).astype(np.uint8)
        elif change == 1:  # cut or pad at the end
            size = arrays[name].itemsize
            raw = raw[: -size * int(rng.integers(1, 3))] if rng.random() < 0.5 else np.append(raw, [0] * size)
        else:  # random bytes throughout
            raw = rng.integers(0, 256, size=len(raw)).astype(np.uint8)
        damaged = rewritten(data, **{name: raw.view(arrays[name].dtype)})
        try:
            CompiledForest.from_bytes(damaged)
            loaded += 1
        except ValueError as exc:
            rejections.append(str(exc))
    # Thresholds, features and counts take many harmless values; the rest must have been caught.
    assert len(rejections) > 150
    assert loaded > 0
    assert all(message.startswith("invalid compiled forest") for message in rejections)
