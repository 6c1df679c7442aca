"""CompiledForest against scikit-learn's IsolationForest: parity, the artifact, and its validation."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.ensemble import IsolationForest

from posguard_models.forest import FORMAT, CompiledForest, StackedForests, _largest_float32_at_most

N_FEATURES = 8
# Columns at very different scales, one of small integers (many ties) and one constant.
SCALES = np.array([1e-3, 1.0, 1e4, 5.0, 1.0, 1e6, 1.0, 1.0])
CONSTANT_COLUMN = 7
TOLERANCE = 1e-9

Array = npt.NDArray[np.float64]


def training_data(rng: np.random.Generator, n_rows: int) -> Array:
    rows: Array = rng.normal(size=(n_rows, N_FEATURES)) * SCALES
    rows[:, 3] = rng.lognormal(size=n_rows)
    rows[:, 4] = rng.integers(0, 5, size=n_rows)
    rows[:, 6] = rng.uniform(-1.0, 1.0, size=n_rows)
    rows[:, CONSTANT_COLUMN] = 7.0
    n_copies = max(2, n_rows // 10)
    rows[-n_copies:] = rows[rng.integers(0, n_rows - n_copies, size=n_copies)]
    return rows


def split_points(model: IsolationForest) -> list[tuple[int, float]]:
    """(global column, float64 threshold) of every split in the forest."""
    points: list[tuple[int, float]] = []
    for estimator, features in zip(model.estimators_, model.estimators_features_, strict=True):
        tree = estimator.tree_
        inner = tree.children_left != -1
        local = tree.feature[inner]
        columns = local if len(features) == N_FEATURES else np.asarray(features)[local]
        points.extend(zip(columns.tolist(), tree.threshold[inner].tolist(), strict=True))
    return points


def probe_rows(model: IsolationForest, rng: np.random.Generator, n_thresholds: int = 250) -> Array:
    """Fresh rows, rows sitting exactly on (and one float32 step around) split thresholds, extremes."""
    fresh = training_data(rng, 300)
    points = split_points(model)
    picks = rng.choice(len(points), size=min(n_thresholds, len(points)), replace=False)
    on_threshold = []
    for pick in picks:
        column, threshold = points[pick]
        t32 = np.float32(threshold)
        for value in (
            threshold,
            float(t32),
            float(np.nextafter(t32, np.float32(-np.inf))),
            float(np.nextafter(t32, np.float32(np.inf))),
        ):
            # On top of a row the forest has seen, so the walk actually reaches this split.
            row = fresh[rng.integers(len(fresh))].copy()
            row[column] = value
            on_threshold.append(row)
    extremes = np.array([3.4e38, -3.4e38, 1e300, -1e300, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45])
    extreme_rows = np.repeat(fresh[:10], len(extremes), axis=0)
    extreme_rows[np.arange(len(extreme_rows)), rng.integers(0, N_FEATURES, len(extreme_rows))] = np.tile(
        extremes, 10
    )
    return np.vstack([fresh, np.array(on_threshold), extreme_rows])


def sklearn_scores(model: IsolationForest, rows: Array) -> Array:
    with warnings.catch_warnings():
        # 1e300 overflows float32 on the way in: scikit-learn warns, then scores it as inf.
        warnings.simplefilter("ignore", RuntimeWarning)
        scores: Array = model.score_samples(rows)
    return scores


def v1_artifact(model: IsolationForest) -> bytes:
    """The format-1 artifact that CompiledForest.to_bytes wrote for this model before format 2.

    Built here from scikit-learn's arrays, as the format-1 compiler did (the bytes were checked to be the
    same), because databases still hold such artifacts and the loader must keep reading them.
    """
    n_features = model.n_features_in_
    names = ("left", "right", "feature", "threshold", "missing_left", "depth", "n_node_samples")
    columns: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in names}
    offsets = [0]
    for estimator, features in zip(model.estimators_, model.estimators_features_, strict=True):
        tree = estimator.tree_
        leaf = tree.children_left == -1
        base = offsets[-1]
        local = tree.feature
        used = local if len(features) == n_features else np.asarray(features)[np.where(leaf, 0, local)]
        columns["left"].append(np.where(leaf, -1, tree.children_left + base))
        columns["right"].append(np.where(leaf, -1, tree.children_right + base))
        columns["feature"].append(np.where(leaf, -1, used))
        columns["threshold"].append(np.where(leaf, np.float32(0), _largest_float32_at_most(tree.threshold)))
        columns["missing_left"].append(tree.missing_go_to_left.astype(np.bool_) & ~leaf)
        columns["depth"].append(np.where(leaf, tree.compute_node_depths() - 1, 0))
        columns["n_node_samples"].append(np.where(leaf, tree.n_node_samples, 0))
        offsets.append(base + tree.node_count)
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "n_features": int(n_features),
        "n_estimators": len(model.estimators_),
        "max_samples": int(model.max_samples_),
        "offset": float(model.offset_),
    }
    dtypes = {"threshold": np.float32, "missing_left": np.bool_, "depth": np.uint8}
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        tree_offsets=np.array(offsets, dtype=np.int32),
        **{name: np.concatenate(columns[name]).astype(dtypes.get(name, np.int32)) for name in names},
    )
    return buffer.getvalue()


def assert_parity(model: IsolationForest, forest: CompiledForest, rows: Array) -> None:
    expected = sklearn_scores(model, rows)
    batch = forest.score_samples(rows)
    assert batch.dtype == np.float64
    assert np.max(np.abs(batch - expected)) <= TOLERANCE
    # What servers score with: the artifact read back, as written now (format 2) and as stored before (1).
    loaded = CompiledForest.from_bytes(forest.to_bytes())
    assert np.array_equal(loaded.score_samples(rows), batch)
    assert np.array_equal(CompiledForest.from_bytes(v1_artifact(model)).score_samples(rows), batch)
    one_by_one = np.array([loaded.score_one(row) for row in rows])
    assert np.max(np.abs(one_by_one - expected)) <= TOLERANCE


# (training rows, max_samples, bootstrap)
SAMPLINGS = {
    "auto-1000": (1000, "auto", False),
    "64-of-1000": (1000, 64, False),
    "tiny-20": (20, "auto", False),
}
MAX_FEATURES = {"all": 1.0, "half": 0.5, "one": 1}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_features", MAX_FEATURES.values(), ids=MAX_FEATURES.keys())
@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_scores_match_sklearn(seed: int, max_features: float, sampling: tuple[int, Any, bool]) -> None:
    n_rows, max_samples, bootstrap = sampling
    rng = np.random.default_rng(seed)
    model = IsolationForest(
        max_samples=max_samples, max_features=max_features, bootstrap=bootstrap, random_state=seed
    ).fit(training_data(rng, n_rows))
    forest = CompiledForest.from_sklearn(model)
    assert_parity(model, forest, probe_rows(model, rng))


def test_scores_match_sklearn_with_bootstrap_and_default_size() -> None:
    rng = np.random.default_rng(11)
    model = IsolationForest(max_samples=200, max_features=0.5, bootstrap=True, random_state=11)
    model.fit(training_data(rng, 1000))
    forest = CompiledForest.from_sklearn(model)
    assert forest.n_estimators == 100
    assert_parity(model, forest, probe_rows(model, rng, n_thresholds=300))


def test_scores_are_the_same_bits_as_sklearn() -> None:
    # Stronger than the 1e-9 contract: leaf values and the sum over trees are formed in scikit-learn's
    # order, so the results agree exactly. A pairwise sum over trees, or adding c(n) to a 0-based depth,
    # would still pass the tolerance but differ in the last bit for many rows.
    rng = np.random.default_rng(21)
    model = IsolationForest(max_features=0.5, random_state=21).fit(training_data(rng, 1000))
    forest = CompiledForest.from_sklearn(model)
    probe = probe_rows(model, rng)
    expected = sklearn_scores(model, probe)
    assert np.array_equal(forest.score_samples(probe), expected)
    assert np.array_equal([forest.score_one(row) for row in probe], expected)


def test_missing_values_follow_sklearn() -> None:
    rng = np.random.default_rng(5)
    complete = training_data(rng, 500)
    with_gaps = complete.copy()
    with_gaps[rng.random(complete.shape) < 0.1] = np.nan
    probe = training_data(rng, 200)
    probe[rng.random(probe.shape) < 0.2] = np.nan
    # Trained without NaN (NaN goes to the larger side) and with NaN (the side is drawn at random).
    for train in (complete, with_gaps):
        model = IsolationForest(n_estimators=50, max_features=0.5, random_state=5).fit(train)
        assert_parity(model, CompiledForest.from_sklearn(model), probe)


def test_single_sample_trees_score_like_sklearn() -> None:
    # max_samples=1 makes the normaliser c(1) zero: scikit-learn then reports -0.5 for every row.
    rng = np.random.default_rng(3)
    model = IsolationForest(n_estimators=10, max_samples=1, random_state=3).fit(training_data(rng, 50))
    forest = CompiledForest.from_sklearn(model)
    probe = training_data(rng, 20)
    assert_parity(model, forest, probe)
    assert np.all(forest.score_samples(probe) == -0.5)


def test_properties_and_immutability() -> None:
    rng = np.random.default_rng(0)
    model = IsolationForest(n_estimators=7, max_samples=32, random_state=0).fit(training_data(rng, 100))
    forest = CompiledForest.from_sklearn(model)
    assert (forest.n_features, forest.n_estimators, forest.max_samples) == (N_FEATURES, 7, 32)
    assert forest.offset == model.offset_
    with pytest.raises(AttributeError):
        forest._n_steps = 0
    with pytest.raises(ValueError, match="read-only"):
        forest._leaf_value[0] = 1.0


def test_threshold_rounding_keeps_every_comparison() -> None:
    rng = np.random.default_rng(9)
    t = np.concatenate(
        [rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, 2000), [0.0, -0.0, 1e39, -1e39]]
    )
    t32 = _largest_float32_at_most(t)
    assert np.all(t32.astype(np.float64) <= t)
    # The next float32 up is already above t, so no float32 lies between t32 and t.
    with np.errstate(over="ignore"):
        assert np.all(np.nextafter(t32, np.float32(np.inf)).astype(np.float64) > t)


@pytest.fixture(scope="module")
def model_and_forest() -> tuple[IsolationForest, CompiledForest]:
    rng = np.random.default_rng(1)
    model = IsolationForest(n_estimators=25, max_features=0.5, random_state=1).fit(training_data(rng, 400))
    return model, CompiledForest.from_sklearn(model)


def test_wrong_shapes_are_rejected(model_and_forest: tuple[IsolationForest, CompiledForest]) -> None:
    _, forest = model_and_forest
    with pytest.raises(ValueError, match="features"):
        forest.score_samples(np.zeros((3, N_FEATURES + 1)))
    with pytest.raises(ValueError, match="features"):
        forest.score_one(np.zeros(N_FEATURES - 1))
    with pytest.raises(ValueError, match="2-D"):
        forest.score_samples(np.zeros(N_FEATURES))
    with pytest.raises(ValueError, match="1-D"):
        forest.score_one(np.zeros((1, N_FEATURES)))
    with pytest.raises(ValueError, match="numeric"):
        forest.score_one(np.array(["1.0"] * N_FEATURES))
    assert forest.score_samples(np.zeros((0, N_FEATURES))).shape == (0,)


def test_round_trip_is_bit_identical_and_pickle_free(
    model_and_forest: tuple[IsolationForest, CompiledForest],
) -> None:
    _, forest = model_and_forest
    data = forest.to_bytes()
    loaded = CompiledForest.from_bytes(data)
    probe = training_data(np.random.default_rng(2), 300)
    assert np.array_equal(loaded.score_samples(probe), forest.score_samples(probe))
    assert [loaded.score_one(row) for row in probe[:20]] == [forest.score_one(row) for row in probe[:20]]
    assert (loaded.n_features, loaded.n_estimators, loaded.max_samples, loaded.offset) == (
        forest.n_features,
        forest.n_estimators,
        forest.max_samples,
        forest.offset,
    )
    assert loaded.to_bytes() == data

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
        meta = json.loads(archive["meta"].tobytes())
    assert (meta["format_version"], meta["n_estimators"]) == (2, forest.n_estimators)


def test_version_1_artifacts_load_as_the_same_forest() -> None:
    # Databases hold format-1 artifacts: read back, they give the very forest that compiling gives now,
    # down to the bytes it writes, so re-saving a stored model changes nothing but its size.
    rng = np.random.default_rng(8)
    data = training_data(rng, 600)
    data[rng.random(data.shape) < 0.05] = np.nan
    probe = probe_rows(IsolationForest(n_estimators=5, random_state=8).fit(data), rng)
    for max_features, bootstrap in ((1.0, False), (0.5, True), (1, False)):
        model = IsolationForest(
            n_estimators=30, max_samples=128, max_features=max_features, bootstrap=bootstrap, random_state=8
        ).fit(data)
        compiled = CompiledForest.from_sklearn(model)
        old = v1_artifact(model)
        loaded = CompiledForest.from_bytes(old)
        assert loaded.to_bytes() == compiled.to_bytes()
        assert len(compiled.to_bytes()) < len(old) / 2
        assert np.array_equal(loaded.score_samples(probe), sklearn_scores(model, probe))
        assert (loaded.n_estimators, loaded.max_samples, loaded.offset) == (30, 128, model.offset_)


def rewritten(data: bytes, **changes: Any) -> bytes:
    """The artifact with some entries replaced, re-saved as a well-formed archive."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries.update(changes)
    for name in [name for name, value in changes.items() if value is None]:
        del entries[name]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **entries)
    return buffer.getvalue()


def with_meta(data: bytes, **changes: Any) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
    meta.update(changes)
    return rewritten(data, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


@pytest.mark.parametrize("version", [2, 1])
def test_corrupt_and_truncated_artifacts_raise_value_error(
    model_and_forest: tuple[IsolationForest, CompiledForest], version: int
) -> None:
    model, forest = model_and_forest
    data = forest.to_bytes() if version == 2 else v1_artifact(model)
    rng = np.random.default_rng(4)
    for cut in [0, 1, 4, 30, 100, len(data) // 2, len(data) - 22, len(data) - 1]:
        with pytest.raises(ValueError, match="invalid compiled forest"):
            CompiledForest.from_bytes(data[:cut])
    rejections = []
    for position in rng.choice(len(data), size=200, replace=False):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        # Any exception other than ValueError escapes and fails the test. A few bytes (timestamps, zip
        # version fields) can change harmlessly; the artifact must then simply load.
        try:
            CompiledForest.from_bytes(bytes(damaged))
        except ValueError as exc:
            rejections.append(str(exc))
    assert len(rejections) > 150
    assert all(message.startswith("invalid compiled forest") for message in rejections)
    for garbage in (b"not an artifact", b"\x93NUMPY" + b"\x00" * 50, rng.bytes(5000)):
        with pytest.raises(ValueError, match="invalid compiled forest"):
            CompiledForest.from_bytes(garbage)
    npy = io.BytesIO()
    np.save(npy, np.arange(5))
    with pytest.raises(ValueError, match="npz"):
        CompiledForest.from_bytes(npy.getvalue())


def test_inconsistent_version_1_artifacts_raise_value_error(
    model_and_forest: tuple[IsolationForest, CompiledForest],
) -> None:
    # Format 2's own cases are in test_forest_compact.py.
    model, _ = model_and_forest
    data = v1_artifact(model)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        left = archive["left"]
        right = archive["right"]
        feature = archive["feature"]
        depth = archive["depth"]
        offsets = archive["tree_offsets"]
    inner = np.flatnonzero(left != -1)
    first, second_root = inner[0], offsets[1]

    def patched(array: npt.NDArray[Any], index: int, value: Any) -> npt.NDArray[Any]:
        copy = array.copy()
        copy[index] = value
        return copy

    cases = {
        "child": rewritten(data, left=patched(left, first, len(left) + 5)),
        "out of range": rewritten(data, right=patched(right, first, first)),  # a cycle onto itself
        "its tree": rewritten(data, left=patched(left, first, second_root + 1)),  # into the next tree
        "one binary tree": rewritten(data, left=patched(left, first, right[first])),  # two parents
        "exactly one child": rewritten(data, right=patched(right, first, -1)),
        "feature is out of range": rewritten(data, feature=patched(feature, first, N_FEATURES)),
        "depths": rewritten(data, depth=patched(depth, int(np.flatnonzero(left == -1)[0]), 200)),
        "dtype": rewritten(data, left=left.astype(np.int64)),
        "1-D": rewritten(data, threshold=np.zeros((len(left), 1), dtype=np.float32)),
        "one per node": rewritten(data, missing_left=np.zeros(3, dtype=np.bool_)),
        "expected": rewritten(data, n_node_samples=None),
        "tree_offsets": rewritten(data, tree_offsets=offsets[:-1]),
        "rise strictly": rewritten(data, tree_offsets=patched(offsets, 1, offsets[2])),
        "format_version": with_meta(data, format_version=99),
        "expected 1 or 2": with_meta(data, format_version=True),
        "n_features": with_meta(data, n_features=True),
        "offset": with_meta(data, offset="x"),
        "UTF-8 JSON": rewritten(data, meta=np.frombuffer(b"\xff{", dtype=np.uint8)),
    }
    for message, artifact in cases.items():
        with pytest.raises(ValueError, match=message):
            CompiledForest.from_bytes(artifact)


def test_stacked_forests_score_each_forest_over_its_columns_bit_for_bit() -> None:
    # The global model walks its core and group forests as one (StackedForests); each must come out as its
    # own score_one, with forests of different depths, column orders and NaN in some columns only.
    rng = np.random.default_rng(8)
    rows = training_data(rng, 600)
    width = rows.shape[1]
    picks = [list(range(width)), [2, 0], [width - 1, 1, 3]]
    forests = [
        CompiledForest.from_sklearn(
            IsolationForest(n_estimators=n, max_samples=samples, random_state=n).fit(rows[:, columns])
        )
        for columns, n, samples in zip(picks, (100, 40, 7), (256, 64, 16), strict=True)
    ]
    stacked = StackedForests(list(zip(forests, picks, strict=True)))
    probe = training_data(rng, 300)
    probe[rng.random(probe.shape) < 0.1] = np.nan
    probe[:100, 2] = np.nan  # NaN in one forest's columns only, for a third of the rows
    for row in probe:
        expected = [forest.score_one(row[columns]) for forest, columns in zip(forests, picks, strict=True)]
        assert stacked.score_one(row) == expected
    with pytest.raises(ValueError, match="columns"):
        StackedForests([(forests[1], [0, 1, 2])])
    with pytest.raises(ValueError, match="row of at least"):
        stacked.score_one(probe[0][:2])
