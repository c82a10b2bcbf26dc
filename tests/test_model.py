import pytest
import torch
import torch.nn.functional as F

from mnist_dist.model import MnistCNN, ModelConfig


def test_reference_architecture_has_31898_parameters():
    assert sum(p.numel() for p in MnistCNN().parameters()) == 31_898
    assert ModelConfig().flat_features == 400


def test_reference_state_dict_loads_strictly(reference_weights):
    state = torch.load(reference_weights, map_location="cpu", weights_only=True)
    model = MnistCNN()
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    assert set(state) == set(model.state_dict())


def test_forward_gives_ten_logits_per_image():
    logits = MnistCNN()(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling_before_relu_is_bit_identical_to_the_reference_order(channels_last):
    torch.manual_seed(0)
    model = MnistCNN()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def reference_forward(x: torch.Tensor) -> torch.Tensor:  # the reference's module order
        x = model.maxpool1(model.conv_layer1(x))
        x = model.maxpool2(model.conv_layer2(x))
        x = torch.flatten(model.conv_layer3(x), 1)
        return model.fc_layer2(model.fc_layer1(x))

    results = []
    for forward in (reference_forward, model):
        model.zero_grad()
        logits = forward(images)
        F.cross_entropy(logits, labels).backward()
        results.append([logits.detach().clone(), *(p.grad.clone() for p in model.parameters())])
    assert all(a.equal(b) for a, b in zip(*results, strict=True))
