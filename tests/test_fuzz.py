"""Property-based fuzzing against torch.nn: random layer options and odd shapes on every backend."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import INTERPRETED, backend_device
from parity import Case, check_layer


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    kwargs = {
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
    }
    H = draw(st.integers(1, 24))
    if family == "LSTM" and H > 1 and draw(st.booleans()):
        kwargs["proj_size"] = draw(st.integers(1, H - 1))
    if family == "RNN":
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    training = draw(st.booleans())
    if kwargs["num_layers"] > 1 and training:
        kwargs["dropout"] = draw(st.sampled_from([0.0, 0.3]))
    case = Case(
        "fuzz",
        kwargs,
        I=draw(st.integers(1, 20)),
        H=H,
        T=draw(st.integers(1, 9)),
        B=draw(st.integers(1, 5)),
        batch_first=draw(st.booleans()),
        unbatched=False,
        with_state=draw(st.booleans()),
        training=training,
    )
    case.packed = draw(st.sampled_from([None, "sorted", "unsorted"]))
    case.unbatched = case.packed is None and draw(st.booleans())
    return family, case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fuzz_layers_against_torch(backend, dtype):
    examples = 6 if backend in INTERPRETED else 40

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(cases())
    def run(family_case):
        family, case = family_case
        check_layer(family, case, backend, dtype, backend_device(backend))

    run()
