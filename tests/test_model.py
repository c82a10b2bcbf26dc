import torch

from mnist_dist.model import MnistCNN, ModelConfig, count_parameters


def test_reference_architecture_has_31898_parameters():
    assert count_parameters(MnistCNN()) == 31_898
    assert ModelConfig().flat_features == 400


def test_reference_state_dict_loads_strictly(reference_weights):
    state = torch.load(reference_weights, map_location="cpu", weights_only=True)
    model = MnistCNN()
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    assert set(state) == set(model.state_dict())


def test_forward_gives_ten_logits_per_image():
    logits = MnistCNN()(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 10)
