"""Validation against the signature: every error names the culprit; casts never change values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgerun.runtime import InvalidInput, Signature, TensorSpec

NUMERIC = ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
           "float16", "float32", "float64"]


def sig(*inputs: TensorSpec, max_batch_size: int | None = None) -> Signature:
    return Signature(inputs, (TensorSpec("y", "float32", (-1, 4), 0),), max_batch_size)


X = TensorSpec("x", "float32", (-1, 4), 0)
IDS = TensorSpec("ids", "int32", (-1, 4), 0)


def test_exact_dtype_passes_through_without_copy():
    array = np.zeros((2, 4), np.float32)
    assert sig(X).validate({"x": array})["x"] is array


def test_unknown_input_is_named_with_what_the_model_takes():
    with pytest.raises(InvalidInput) as info:
        sig(X).validate({"x": np.zeros((1, 4), np.float32), "z": [1]})
    assert "unknown input 'z'" in str(info.value)
    assert "'x' (float32 [-1, 4])" in str(info.value)
    assert info.value.tensor == "z"


def test_missing_input_is_named():
    with pytest.raises(InvalidInput, match="missing input 'ids'") as info:
        sig(X, IDS).validate({"x": np.zeros((1, 4), np.float32)})
    assert info.value.tensor == "ids"


def test_wrong_rank_names_input_and_expected_shape():
    with pytest.raises(InvalidInput, match=r"input 'x': expected rank 2 \[-1, 4\], got shape \[4\]"):
        sig(X).validate({"x": np.zeros(4, np.float32)})


def test_wrong_fixed_dim():
    with pytest.raises(InvalidInput, match=r"input 'x': dim 1 must be 4 .* got shape \[2, 5\]"):
        sig(X).validate({"x": np.zeros((2, 5), np.float32)})


def test_lossy_dtype_is_refused():
    with pytest.raises(InvalidInput, match="input 'ids': expected int32, got float64"):
        sig(IDS).validate({"ids": np.ones((1, 4))})


def test_float64_to_int8_is_refused_even_when_integral():
    spec = TensorSpec("q", "int8", (-1,), 0)
    with pytest.raises(InvalidInput, match="expected int8, got float64"):
        spec.conform(np.array([1.0, 2.0]))


def test_int_list_to_float32_is_fine():
    out = sig(X).validate({"x": [[1, 2, 3, 4]]})["x"]
    assert out.dtype == np.float32 and out.tolist() == [[1, 2, 3, 4]]


def test_json_floats_narrow_to_float32():
    out = X.conform([[0.1, 0.2, 0.3, 0.4]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.float32([[0.1, 0.2, 0.3, 0.4]]))


def test_integers_too_large_for_float32_are_refused():
    with pytest.raises(InvalidInput, match="beyond"):
        X.conform(np.array([[2**25 + 1, 0, 0, 0]], dtype=np.int64))


def test_int64_beyond_2_53_is_not_float64():
    spec = TensorSpec("t", "float64", (-1,), 0)
    assert spec.conform(np.array([2**53], np.int64)).tolist() == [2.0**53]
    with pytest.raises(InvalidInput, match="beyond"):
        spec.conform(np.array([2**53 + 1], np.uint64))


def test_empty_data_take_any_dtype():
    assert TensorSpec("b", "bool", (-1, -1), 0).conform([[]]).dtype == np.bool_
    assert IDS.conform(np.zeros((0, 4))).dtype == np.int32


def test_int_list_fits_int32():
    assert IDS.conform([[1, -2, 3, 4]]).dtype == np.int32


def test_int_out_of_range_is_refused():
    with pytest.raises(InvalidInput, match=r"out of int32 range"):
        IDS.conform([[2**40, 0, 0, 0]])


def test_integers_beyond_64_bits_are_refused_as_out_of_range_not_as_nulls():
    # a JSON integer past 64 bits (numpy keeps it as an object) was "got null, mixed or nested
    # values": the caller sent one number, too large
    with pytest.raises(InvalidInput, match=r"input 'ids': integer values beyond 64 bits are "
                                           r"out of int32 range"):
        IDS.conform([[2**70, 0, 0, 0]])
    with pytest.raises(InvalidInput, match="beyond 64 bits cannot be float32 exactly"):
        X.conform([[-(2**80) - 1, 0, 0, 0]])


def test_float_overflow_is_refused():
    with pytest.raises(InvalidInput, match="overflow float16"):
        TensorSpec("h", "float16", (-1,), 0).conform(np.array([1e6]))


def test_strings_into_numbers_are_refused():
    with pytest.raises(InvalidInput, match="expected float32, got string"):
        X.conform([["a", "b", "c", "d"]])


def test_nulls_and_objects_into_numbers_are_not_called_strings():
    for value in ([[1, 2, 3, None]], [[{"a": 1}] * 4]):
        with pytest.raises(InvalidInput, match="expected float32, got null, mixed or nested"):
            X.conform(value)


def test_ragged_list_is_refused():
    with pytest.raises(InvalidInput, match="input 'x': not a rectangular array"):
        X.conform([[1, 2, 3, 4], [1, 2]])


def test_string_tensor_accepts_text():
    spec = TensorSpec("s", "string", (-1,), 0)
    out = spec.conform(["héllo", "x"])
    assert out.dtype == object and out.tolist() == ["héllo", "x"]
    with pytest.raises(InvalidInput, match="expected string, got int at element 0"):
        spec.conform([1, 2])
    with pytest.raises(InvalidInput, match="expected string, got int64"):
        spec.conform(np.array([1, 2]))


def test_string_tensor_refuses_non_text_elements():
    # None and numbers once became "None" and "1" on their way through a numpy str array
    spec = TensorSpec("s", "string", (-1,), 0)
    with pytest.raises(InvalidInput, match="input 's': expected string, got NoneType at "
                                           "element 1"):
        spec.conform(["a", None])
    with pytest.raises(InvalidInput, match="got float at element 0"):
        spec.conform(np.array([1.5, "b"], dtype=object))
    with pytest.raises(InvalidInput, match="input 's': not a rectangular array"):
        TensorSpec("s", "string", (-1, -1), 0).conform([["a", "b"], ["c"]])


def test_string_tensor_nested_past_numpys_iterators_is_a_400():
    """numpy's flat iterator stops at 32 dimensions: 40 nested lists raised RuntimeError, a
    500, where the tensor's rank is what is wrong."""
    value = "a"
    for _ in range(40):
        value = [value]
    spec = TensorSpec("s", "string", (-1,), 0)
    with pytest.raises(InvalidInput, match="'s'"):
        spec.conform(value)
    assert TensorSpec("s", "string", (-1,) * 40, 0).conform(value).ndim == 40
    mixed = ["a", None]
    for _ in range(39):
        mixed = [mixed]
    with pytest.raises(InvalidInput, match="input 'f': expected float32, got null, mixed"):
        TensorSpec("f", "float32", (-1,) * 40, 0).conform(mixed)  # the same, into numbers


def test_string_tensor_keeps_trailing_nul_bytes():
    spec = TensorSpec("s", "string", (-1,), 0)
    assert spec.conform(["ab\0", b"c\0\0"]).tolist() == ["ab\0", b"c\0\0"]


def test_inputs_must_agree_on_batch():
    with pytest.raises(InvalidInput, match="'x' has 2 rows, 'ids' has 3"):
        sig(X, IDS).validate({"x": np.zeros((2, 4), np.float32),
                              "ids": np.zeros((3, 4), np.int32)})


def test_max_batch_size_is_enforced():
    with pytest.raises(InvalidInput, match="batch of 5 exceeds the model's max_batch_size 4"):
        sig(X, max_batch_size=4).validate({"x": np.zeros((5, 4), np.float32)})


def test_inputs_must_be_a_mapping():
    with pytest.raises(InvalidInput, match="mapping"):
        sig(X).validate([np.zeros((1, 4), np.float32)])


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(NUMERIC), target=st.sampled_from(NUMERIC), data=st.data())
def test_a_cast_either_keeps_every_value_or_is_refused(source, target, data):
    array = data.draw(hnp.arrays(np.dtype(source), hnp.array_shapes(min_dims=1, max_dims=3,
                                                                    max_side=4)))
    spec = TensorSpec("t", target, (-1,) * array.ndim, 0)
    try:
        out = spec.conform(array)
    except InvalidInput as exc:
        assert exc.tensor == "t"
        return
    assert out.dtype == np.dtype(target) and out.shape == array.shape
    src, dst = np.dtype(source), np.dtype(target)
    if src.kind == "f" and dst.kind == "f" and dst.itemsize < src.itemsize:
        # the one accepted change: float rounding; never a new inf, nan stays nan
        finite = np.isfinite(array)
        assert np.array_equal(np.isnan(out), np.isnan(array))
        assert np.isfinite(out[finite]).all()
        info = np.finfo(dst)
        np.testing.assert_allclose(out[finite].astype(np.float64), array[finite],
                                   rtol=float(info.eps), atol=float(info.tiny))
    else:
        # every other accepted cast is exact: compare as Python numbers
        assert dst.kind != "b" or src.kind == "b"
        assert not (src.kind == "f" and dst.kind in "iu")
        back = out.astype(src) if src.kind != "f" else out.astype(np.float64)
        expected = array if src.kind != "f" else array.astype(np.float64)
        assert np.array_equal(back, expected, equal_nan=src.kind == "f")
