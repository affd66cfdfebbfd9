"""Calibration data readers: the accepted layouts and every error a user can make."""

from __future__ import annotations

import numpy as np
import pytest

from espstream.errors import UserError
from espstream.quant.data import InputSpec, random_data, read_calibration_data

X = InputSpec("x", (1, 16, 24), np.dtype(np.float32))
Y = InputSpec("y", (1, 4), np.dtype(np.float32))


def _samples(path, inputs, limit=None):
    return list(read_calibration_data(str(path), inputs, limit))


def test_npy_stacked_batch1_and_single(tmp_path):
    a = np.arange(3 * 16 * 24, dtype=np.float64).reshape(3, 16, 24)
    np.save(tmp_path / "a.npy", a)  # [N, 16, 24] for an input [1, 16, 24]
    np.save(tmp_path / "b.npy", a[:, None])  # [N, 1, 16, 24]
    np.save(tmp_path / "c.npy", a[:1])  # exactly the input shape: one sample
    for name, n in (("a", 3), ("b", 3), ("c", 1)):
        s = _samples(tmp_path / f"{name}.npy", [X])
        assert len(s) == n
        assert s[-1]["x"].shape == (1, 16, 24) and s[-1]["x"].dtype == np.float32
        np.testing.assert_array_equal(s[-1]["x"][0], a[n - 1])


def test_npz_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d1.npz", x=rng.standard_normal((2, 16, 24)), y=rng.standard_normal((2, 4)))
    np.savez(tmp_path / "d2.npz", x=rng.standard_normal((1, 16, 24)), y=rng.standard_normal((1, 4)))
    (tmp_path / "notes.txt").write_text("ignored")
    data = read_calibration_data(str(tmp_path), [X, Y])
    assert len(data) == 3
    s = list(data)
    assert [sorted(d) for d in s] == [["x", "y"]] * 3
    assert s[0]["y"].shape == (1, 4)
    assert len(list(data)) == 3  # re-iterable
    assert len(read_calibration_data(str(tmp_path), [X, Y], limit=2)) == 2
    assert len(list(read_calibration_data(str(tmp_path), [X, Y], limit=2))) == 2


def test_wrong_shape_names_file_input_and_both_shapes(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((5, 16, 23), np.float32))
    with pytest.raises(UserError) as e:
        read_calibration_data(str(tmp_path / "bad.npy"), [X])
    msg = str(e.value)
    assert "bad.npy" in msg and "'x'" in msg and "[5, 16, 23]" in msg and "[1, 16, 24]" in msg


def test_nan_and_inf_are_refused_with_the_sample(tmp_path):
    a = np.zeros((4, 16, 24), np.float32)
    a[2, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", a)
    data = read_calibration_data(str(tmp_path / "nan.npy"), [X])
    with pytest.raises(UserError, match=r"nan.npy: input 'x', sample 2: contains NaN"):
        list(data)
    a[2, 3, 4] = np.inf
    np.save(tmp_path / "inf.npy", a)
    with pytest.raises(UserError, match="contains Inf"):
        list(read_calibration_data(str(tmp_path / "inf.npy"), [X]))


def test_unknown_key_missing_input_and_npy_for_two_inputs(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.zeros((1, 16, 24)), z=np.zeros((1, 4)))
    with pytest.raises(UserError, match=r"k.npz: key 'z' is not an input of the model"):
        read_calibration_data(str(tmp_path / "k.npz"), [X, Y])
    np.savez(tmp_path / "m.npz", x=np.zeros((1, 16, 24)))
    with pytest.raises(UserError, match=r"m.npz: no array for input 'y'"):
        read_calibration_data(str(tmp_path / "m.npz"), [X, Y])
    np.save(tmp_path / "one.npy", np.zeros((1, 16, 24)))
    with pytest.raises(UserError, match="has 2 inputs"):
        read_calibration_data(str(tmp_path / "one.npy"), [X, Y])
    np.savez(tmp_path / "n.npz", x=np.zeros((2, 16, 24)), y=np.zeros((3, 4)))
    with pytest.raises(UserError, match="different numbers of samples"):
        read_calibration_data(str(tmp_path / "n.npz"), [X, Y])


def test_empty_folder_missing_path_and_other_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .npy or .npz"):
        read_calibration_data(str(tmp_path / "empty"), [X])
    with pytest.raises(UserError, match="no such file"):
        read_calibration_data(str(tmp_path / "nope.npy"), [X])
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match=".npy, a .npz or a folder"):
        read_calibration_data(str(tmp_path / "data.csv"), [X])
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a readable .npy"):
        read_calibration_data(str(tmp_path / "broken.npy"), [X])


def test_symbolic_dimensions(tmp_path):
    spec = InputSpec("x", (None, 16, None), np.dtype(np.float32))
    np.save(tmp_path / "a.npy", np.zeros((3, 16, 40), np.float32))
    s = _samples(tmp_path / "a.npy", [spec])
    assert len(s) == 3 and s[0]["x"].shape == (1, 16, 40)


def test_random_data():
    data = random_data([X], 5, seed=3)
    s = list(data)
    assert len(s) == 5 and s[0]["x"].shape == (1, 16, 24)
    again = list(random_data([X], 5, seed=3))
    np.testing.assert_array_equal(s[4]["x"], again[4]["x"])
    with pytest.raises(UserError, match="fixed dimensions"):
        random_data([InputSpec("x", (1, None), np.dtype(np.float32))], 2)


def test_random_noise_is_drawn_on_demand_with_the_whole_array_values():
    from espstream.quant.data import InputSpec

    f32 = np.dtype("float32")
    ins = [InputSpec("a", (1, 3, 4), f32), InputSpec("b", (None, 2), f32), InputSpec("c", (), f32)]
    d = random_data(ins, 5, seed=3)
    rng = np.random.default_rng(3)
    want = {"a": rng.standard_normal((5, 1, 3, 4)), "b": rng.standard_normal((5, 1, 2)),
            "c": rng.standard_normal((5,))}
    for _ in range(2):  # re-iterable
        got = list(d)
        assert len(got) == 5
        for i, s in enumerate(got):
            for k, w in want.items():
                assert s[k].dtype == f32 and s[k].shape == w[i].shape
                assert np.array_equal(s[k], w[i].astype(f32))
    src = d._sources[0][1]["a"]
    assert np.array_equal(src.take(1), want["a"][1].astype(f32))  # out of order too


def test_input_values_fill_inputs_the_data_do_not_hold(tmp_path):
    # rule 6: an explicit state at its start (zeros) beside a .npy of the data input
    a = np.arange(3 * 16 * 24, dtype=np.float32).reshape(3, 16, 24)
    np.save(tmp_path / "x.npy", a)
    h = InputSpec("h", (1, 1, 4), np.dtype(np.float32))
    n = InputSpec("n", (1,), np.dtype(np.int64))
    s = list(read_calibration_data(str(tmp_path / "x.npy"), [X, h, n], values={"h": 0, "n": 7}))
    assert len(s) == 3
    np.testing.assert_array_equal(s[2]["x"][0], a[2])
    assert s[1]["h"].shape == (1, 1, 4) and not s[1]["h"].any()
    assert s[0]["n"].dtype == np.int64 and s[0]["n"].tolist() == [7]
    np.savez(tmp_path / "d.npz", x=a)  # a .npz need not hold the filled input either
    assert len(read_calibration_data(str(tmp_path / "d.npz"), [X, h], values={"h": 0.5})) == 3


def test_input_values_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 24), np.float32))
    with pytest.raises(UserError, match=r"--input-value z: the model has no input 'z'"):
        read_calibration_data(str(tmp_path / "x.npy"), [X], values={"z": 0})
    with pytest.raises(UserError, match=r"names every input of the model"):
        read_calibration_data(str(tmp_path / "x.npy"), [X], values={"x": 0})
    with pytest.raises(UserError, match=r"a .npy holds one array"):  # y neither given nor held
        read_calibration_data(str(tmp_path / "x.npy"), [X, Y, InputSpec("h", (1,), X.dtype)],
                              values={"h": 0})
