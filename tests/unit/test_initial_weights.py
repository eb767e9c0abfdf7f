"""The starting weights are drawn without torch (the aggregator starts runs and does not load it), and they are
torch's own draws: a model starts exactly where `torch.manual_seed(seed)` and `nn.Linear` would have started it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from health_mlops.ml.initial_weights import layer_sizes, seeded_weights
from health_mlops.ml.model import build_model
from health_mlops.spec import ModelDefaults, load_spec

FAMILIES = [(load_spec("health-risk").model, 27), (load_spec("diabetes").model, 10),
            (ModelDefaults(kind="linear"), 4), (ModelDefaults(kind="mlp", hidden=(64, 64, 8)), 3)]


def torch_draws(config: ModelDefaults, n_inputs: int, seed: int) -> dict[str, np.ndarray]:
    """What torch itself draws: its generator seeded, then the Linear layers built in order."""
    torch.manual_seed(seed)
    drawn = {}
    for i, (fan_in, fan_out) in enumerate(layer_sizes(config, n_inputs)):
        layer = nn.Linear(fan_in, fan_out)
        drawn[f"{2 * i}.weight"], drawn[f"{2 * i}.bias"] = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    return drawn


@pytest.mark.parametrize(("config", "n_inputs"), FAMILIES, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1, 2**32 + 5])
def test_the_starting_weights_are_torchs_draws_bit_for_bit(config: ModelDefaults, n_inputs: int, seed: int) -> None:
    ours, theirs = seeded_weights(config, n_inputs, seed), torch_draws(config, n_inputs, seed)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == np.float32 and np.array_equal(ours[name], theirs[name]), name


def test_a_built_model_holds_them_and_leaves_torchs_generator_alone() -> None:
    config, n_inputs = FAMILIES[0]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = build_model(config, n_inputs, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    built = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    assert all(np.array_equal(built[name], array) for name, array in seeded_weights(config, n_inputs, 5).items())
    assert not np.array_equal(built["0.weight"], seeded_weights(config, n_inputs, 6)["0.weight"])
