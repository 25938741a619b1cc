"""Model.predict converts inputs of non-native byte order (issue 12,
failure 12): np.ones((4, 4), ">f4") is float32 data, not an unsupported
dtype."""
import numpy as np
import pytest
import torch

import kiln


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("byteorder") / "linear.pt"
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(path))
    return kiln.load(path)


@pytest.mark.parametrize("order", [">", "<", "="])
def test_predict_any_byte_order(linear, order):
    x = np.arange(16, dtype=np.float32).reshape(4, 4) / 7
    want = linear.predict(x)
    got = linear.predict(x.astype(np.dtype(np.float32).newbyteorder(order)))
    np.testing.assert_array_equal(got, want)


def test_big_endian_float64_is_not_a_dtype_refusal(linear):
    x = np.ones((2, 4), ">f8")
    try:
        linear.predict(x)  # the model takes float32: it may answer or say so
    except TypeError as e:
        pytest.fail(f"a big-endian float64 was refused as a dtype: {e}")
    except kiln.KilnError:
        pass
    with pytest.raises(TypeError, match="not supported"):
        linear.predict(np.ones((2, 4), np.complex64))
