"""fusion.balance: ogm_ge slows the encoder of the modality that is ahead, by the paper's coefficient."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SYNTH_CONFIG, TINY


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleDict({m: nn.Linear(4, 3) for m in ("image", "text", "tabular")})


def _aux(logits: dict, present=None) -> dict:
    n = len(next(iter(logits.values())))
    return {m: (torch.tensor(z, dtype=torch.float32)[:, None],
                torch.ones(n, dtype=torch.bool) if present is None or m not in present else present[m])
            for m, z in logits.items()}


def test_the_modality_ahead_is_slowed_by_the_papers_coefficient():
    """Text's head is right with p = sigmoid(3) on every record, image's with 0.5, tabular's with
    sigmoid(0.5): only text is above the mean, and its k is 1 - tanh(alpha (s / mean - 1))."""
    from multimodal.training.balance import GradientModulation

    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    sign = 2 * y.numpy() - 1
    gm = GradientModulation(_Net(), alpha=0.5, task="binary", seed=0, noise=False)
    k = gm.coefficients(_aux({"image": 0 * sign, "text": 3 * sign, "tabular": 0.5 * sign}), y)
    s = np.array([0.5, 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-0.5))])
    assert k["image"] == 1.0 and k["tabular"] == 1.0
    assert k["text"] == pytest.approx(1 - math.tanh(0.5 * (s[1] / s.mean() - 1)), abs=1e-6)
    assert k["text"] < 0.99
    assert set(gm.coefficients(_aux({m: 2 * sign for m in ("image", "text", "tabular")}), y).values()) == {1.0}


def test_only_records_that_have_the_modality_score_it():
    """A modality absent from the batch is not scored and left alone; with one left, nothing is slowed."""
    from multimodal.training.balance import GradientModulation

    y = torch.tensor([1.0, 0.0])
    gm = GradientModulation(_Net(), alpha=1.0, task="binary", seed=0, noise=False)
    none = torch.zeros(2, dtype=torch.bool)
    k = gm.coefficients(_aux({"image": [5.0, -5.0], "text": [0.0, 0.0], "tabular": [0.0, 0.0]},
                             {"text": none, "tabular": none}), y)
    assert k == {"image": 1.0, "text": 1.0, "tabular": 1.0}
    k = gm.coefficients(_aux({"image": [5.0, -5.0], "text": [0.0, 0.0], "tabular": [-5.0, 5.0]},
                             {"image": torch.tensor([True, False])}), y)
    assert k["image"] < 1 and k["text"] == 1.0 and k["tabular"] == 1.0  # image scored on its one record only


def test_gradients_are_scaled_per_encoder_and_the_noise_is_seeded():
    from multimodal.training.balance import GradientModulation

    y = torch.tensor([1.0, 0.0])
    aux = _aux({"image": [0.0, 0.0], "text": [4.0, -4.0], "tabular": [0.0, 0.0]})

    def grads(noise: bool, seed: int = 0, alpha: float = 1.0) -> tuple[dict, dict]:
        net = _Net()
        g = torch.Generator().manual_seed(7)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        k = GradientModulation(net, alpha=alpha, task="binary", seed=seed, noise=noise).scale(aux, y)
        return k, {n: p.grad.clone() for n, p in net.named_parameters()}

    _, raw = grads(noise=False, alpha=0.0)  # alpha 0: every k is 1, the gradients as they came
    k, g = grads(noise=False)
    assert k["text"] < 1 and torch.allclose(g["encoders.text.weight"], raw["encoders.text.weight"] * k["text"])
    assert torch.equal(g["encoders.image.weight"], raw["encoders.image.weight"])
    _, noisy = grads(noise=True)
    extra = noisy["encoders.image.weight"] - g["encoders.image.weight"]
    assert 0.3 < (extra.std() / g["encoders.image.weight"].std()).item() < 3  # noise of the gradient's own spread
    assert torch.equal(noisy["encoders.image.bias"], g["encoders.image.bias"])  # weights only, as the authors
    _, again = grads(noise=True)
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)
    _, other = grads(noise=True, seed=1)
    assert not torch.equal(noisy["encoders.text.weight"], other["encoders.text.weight"])


def test_multiclass_scores_use_the_true_class_probability():
    from multimodal.training.balance import GradientModulation

    gm = GradientModulation(_Net(), alpha=0.5, task="multiclass", seed=0)
    p = gm.true_class_prob(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2]))
    assert torch.allclose(p, torch.tensor([math.exp(2) / (math.exp(2) + 2), 1 / 3]))


def test_ogm_ge_training_is_reproducible_and_survives_reload(cohort, tmp_path):
    """Two fits from one config and seed give the same weights (the noise has its own seeded generator),
    and the saved model predicts as it did."""
    from multimodal import DiagnosisModel

    over = TINY | {"fusion.balance": "ogm_ge", "fusion.aux_weight": 0.5, "text.encoder": "bow"}
    states, probs = [], []
    for i in range(2):
        model = DiagnosisModel.from_config(SYNTH_CONFIG, **over)
        model.fit(cohort["train"], cohort["val"], progress=False)
        states.append(model.net.state_dict())
        probs.append(model.predict(cohort["test"]).filter(like="prob_").to_numpy())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    out = model.save(tmp_path / "model")
    again = DiagnosisModel.load(out).predict(cohort["test"]).filter(like="prob_").to_numpy()
    assert np.array_equal(again, probs[1])
    plain = DiagnosisModel.from_config(SYNTH_CONFIG, **(over | {"fusion.balance": "none"}))
    plain.fit(cohort["train"], cohort["val"], progress=False)
    assert not all(torch.equal(states[0][k], v) for k, v in plain.net.state_dict().items())


def test_ogm_ge_needs_the_auxiliary_heads():
    from multimodal import DiagnosisModel, UserError

    with pytest.raises((UserError, ValueError), match="ogm_ge needs fusion.aux_weight"):
        DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {"fusion.balance": "ogm_ge", "fusion.aux_weight": 0}))


RANKS = """
import json, sys, torch
import torch.distributed as dist
from pathlib import Path
from multimodal import distributed
from multimodal.training.balance import GradientModulation
sys.path.insert(0, sys.argv[1])
from test_balance import _Net, _aux, _batch
distributed.init(torch.device("cpu"))
aux, y = _batch(distributed.rank())
k = GradientModulation(_Net(), 1.0, "binary", 0).coefficients(aux, y)
Path(sys.argv[2], f"rank{distributed.rank()}.json").write_text(json.dumps(k))
dist.barrier()
dist.destroy_process_group()
"""


def _batch(rank: int):
    """Rank 0 sees records where text is right, rank 1 records where image is: only the sum says which leads."""
    y = torch.tensor([1.0, 0.0, 1.0])
    sign = (2 * y - 1).numpy()
    return _aux({"image": (0.2 if rank == 0 else 4.0) * sign, "text": (3.0 if rank == 0 else 0.1) * sign,
                 "tabular": 0.5 * sign}), y


def test_ranks_agree_on_the_coefficients_of_the_whole_batch(tmp_path):
    """Under torchrun each rank scores its share of the global batch; the coefficients come from the
    scores summed over ranks, so every rank scales alike (else DDP's replicas drift apart) and as one
    process over the whole batch would."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from multimodal.training.balance import GradientModulation

    (tmp_path / "ranks.py").write_text(RANKS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "ranks.py"), str(Path(__file__).parent), str(tmp_path)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    per_rank = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    (a0, y0), (a1, y1) = _batch(0), _batch(1)
    whole = {m: (torch.cat([a0[m][0], a1[m][0]]), torch.cat([a0[m][1], a1[m][1]])) for m in a0}
    expected = GradientModulation(_Net(), 1.0, "binary", 0).coefficients(whole, torch.cat([y0, y1]))
    alone = GradientModulation(_Net(), 1.0, "binary", 0).coefficients(*_batch(0))
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert per_rank[0] == pytest.approx(expected, abs=1e-6) and alone != pytest.approx(expected, abs=1e-3)
