"""Prediction runs a copy of the network with BatchNorm folded into the convolutions: the same
features and probabilities, and the model's own network (what is trained and saved) untouched."""
import pytest
import torch
import torch.nn as nn

from encoders import ENCODERS
from encoders.fold import fold_batchnorm


def _trained_like(enc: nn.Module, seed: int = 1) -> None:
    """BatchNorm statistics and affine terms away from their initial 0/1, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.2, 3.0, generator=g)
            m.weight.data.normal_(1, 0.3, generator=g)
            m.bias.data.normal_(0, 0.3, generator=g)


@pytest.mark.parametrize("arch", ["resnet10t", "efficientnet_lite0", "mobilenetv3_small_050"])
def test_batchnorm_folds_into_the_convolutions_with_the_same_tokens(arch):
    enc = ENCODERS.create("timm", model_name=arch, in_chans=3, image_size=64, token_grid=2).eval()
    _trained_like(enc)
    x, mask = torch.rand(3, 2, 3, 64, 64), torch.tensor([[True, True], [True, False], [False, False]])
    with torch.no_grad():
        before = enc(x, mask).x
        folded = enc.fold_batchnorm_()
        after = enc(x, mask).x
    assert folded > 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))


class _ResidualOnRaw(nn.Module):
    """A BatchNorm reads the convolution's output, and so does the sum after it: folding would
    change the second use, so nothing may be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_whose_output_is_also_read_elsewhere_is_left_unfolded():
    net = _ResidualOnRaw().eval()
    _trained_like(net)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net, x) == 0
        after = net(x)
    assert isinstance(net.bn, nn.BatchNorm2d)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_predict_runs_a_folded_copy_and_leaves_the_model_as_saved(tiny_model, cohort, tmp_path):
    from multimodal.model.network import for_inference

    net = tiny_model.net
    state = {k: v.clone() for k, v in net.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 0
    probs = tiny_model.predict(cohort["test"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tiny_model._predictor().modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tiny_model.net.modules()) == n_bn
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    from multimodal.model.network import state_version

    tiny_model._fast = (net, state_version(net), net)  # the unfolded network as the predictor
    plain = tiny_model.predict(cohort["test"])
    tiny_model._fast = None
    cols = [c for c in probs if c.startswith("prob_")]
    assert (probs["status"] == "ok").all()
    assert float((probs[cols] - plain[cols]).abs().max().max()) < 1e-5
    assert (probs["pred"] == plain["pred"]).all()
    assert for_inference(net) is not net


def test_predict_follows_the_network_when_it_changes_in_place(tiny_model, cohort):
    """The folded copy is made again after an in-place change (here the calibration), never stale."""
    before = tiny_model.predict(cohort["test"])
    with tiny_model.uncalibrated():
        raw = tiny_model.predict(cohort["test"])
    after = tiny_model.predict(cohort["test"])
    assert float((raw["prob_1"] - before["prob_1"]).abs().max()) > 1e-4
    assert (after["prob_1"] == before["prob_1"]).all()

