"""Local training of every algorithm on a tiny model: it learns, it is reproducible, it validates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from feddifrc_core.algorithms import Algorithm, algorithm_names, get_algorithm
from feddifrc_core.config import RunConfig
from feddifrc_core.evaluation import evaluate, extract_features
from feddifrc_core.seeding import seedsequence_seed
from feddifrc_core.targets import DiffusionTargets
from feddifrc_core.training import train_local

N, C, D, K = 48, 3, 8, 2


class TinyNet(nn.Module):
    """forward(x) -> (features [B, D], logits [B, C]) like the project's models."""

    feature_dim = D

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, D), nn.Dropout(0.1),
        )
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x)
        return z, self.head(z)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Class c lights up quadrant c of an 8x8 image, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % C
    images = torch.randint(0, 60, (N, 1, 8, 8), generator=g)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, 0, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 180
    return images.to(torch.uint8), labels.long()


def _targets() -> DiffusionTargets:
    """Like real diffusion features: one prototype per prompt (class) plus per-image noise."""
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(C, D, generator=g)  # [C, D]
    labels = torch.arange(N) % C
    others = torch.stack([(labels + 1) % C, (labels + 2) % C], dim=1)  # [N, K]
    return DiffusionTargets(positive=protos[labels] + 0.1 * torch.randn(N, D, generator=g),
                            negatives=protos[others] + 0.1 * torch.randn(N, K, D, generator=g),
                            null=0.5 * protos[labels] + 0.1 * torch.randn(N, D, generator=g))


def _teacher_logits(wrong_every: int = 0) -> torch.Tensor:
    """A teacher sure of the true class, or of the next class on every `wrong_every`-th image."""
    labels = torch.arange(N) % C
    wrong = torch.arange(N) % wrong_every == wrong_every - 1 if wrong_every else labels < 0
    said = torch.where(wrong, (labels + 1) % C, labels)
    return 4.0 * torch.nn.functional.one_hot(said, C).float()  # [N, C]


def flip_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + small noise, all drawn from `generator` on the CPU."""
    x = images.float() / 255.0
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # [B]
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return x + 0.05 * torch.randn(x.shape, generator=generator).to(x.device)


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _settings(algorithm: str, **kw: object) -> RunConfig:
    base = dict(algorithm=algorithm, local_epochs=6, batch_size=16, lr=0.05, momentum=0.9,
                weight_decay=0.0, seed=3, tau=0.5)
    base.update(kw)
    return RunConfig().replace(**base)


def _algo(algorithm: str, targets: DiffusionTargets | None = None,
          previous_model: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
          **kw: object) -> Algorithm:
    """The run's algorithm with what `begin_update` gives it on a client (targets, the previous
    local model, the teacher's logits), where the algorithm trains with them."""
    algo = _settings(algorithm, **kw).new_algorithm()
    if targets is not None and hasattr(algo, "targets"):
        algo.targets = targets
    if previous_model is not None and hasattr(algo, "previous_model"):
        algo.previous_model = previous_model
    if teacher_logits is not None and hasattr(algo, "teacher"):
        algo.teacher = teacher_logits
    return algo


class PoisonLabels:
    """Any use of this object (attribute, indexing, len, iteration) fails the test."""

    def __getattribute__(self, name: str) -> object:
        raise AssertionError(f"labels were accessed: .{name}")

    def __len__(self) -> int:
        raise AssertionError("labels were accessed: len()")

    def __getitem__(self, item: object) -> object:
        raise AssertionError("labels were accessed: []")


# The loss parts each algorithm reports (an algorithm added later is checked for the rest).
EXPECTED_PARTS = {"fedavg": {"ce"}, "fedavgm": {"ce"}, "fedprox": {"ce", "prox"},
                  "moon": {"ce", "moon"}, "feddifrc": {"ce", "tdcl", "ndcr"},
                  "feddifrc-ssl": {"tdcl", "ndcr"}, "simclr": {"ntxent"}, "fedavg-kd": {"ce", "kd"}}


@pytest.mark.parametrize("algorithm", algorithm_names())
def test_training_lowers_the_loss(algorithm: str) -> None:
    images, labels = _data()
    model = _model()
    ssl = get_algorithm(algorithm).label_free
    # FedDifRC's targets, a distinct previous local model (MOON) and the teacher's logits
    # (distillation), for those that use them
    algo = _algo(algorithm, targets=_targets(), previous_model=_model(seed=5),
                 teacher_logits=_teacher_logits())
    res = train_local(model, images, None if ssl else labels, algo, "cpu", transform=flip_transform)
    first, last = res.epochs[0], res.epochs[-1]
    assert len(res.epochs) == 6 and res.num_examples == N
    # NT-Xent over 32 views falls slowly from ~log(31); the others drop fast on this toy set
    factor = 0.95 if algorithm == "simclr" else 0.8
    assert last["loss"] < factor * first["loss"], (algorithm, first, last)
    assert res.loss == last["loss"] and res.metrics == last
    if algorithm in EXPECTED_PARTS:
        assert set(last) == EXPECTED_PARTS[algorithm] | {"loss", "accuracy"}
    assert ("ce" in last) == (not ssl)
    if not ssl:
        assert last["accuracy"] > first["accuracy"]


def test_same_seed_is_bit_identical_and_another_seed_differs() -> None:
    images, labels = _data()
    init = _model()
    runs = []
    for seed in (3, 3, 4):
        model = copy.deepcopy(init)
        res = train_local(model, images, labels,
                          _algo("feddifrc", _targets(), seed=seed, local_epochs=2),
                          "cpu", transform=flip_transform)
        runs.append((res.epochs, model.state_dict()))
    (e1, s1), (e2, s2), (e3, s3) = runs
    assert e1 == e2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_global_rng_state_is_left_alone() -> None:
    images, labels = _data()
    state = torch.get_rng_state()
    train_local(_model(), images, labels, _algo("fedavg", local_epochs=1), "cpu",
                transform=flip_transform)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("algorithm", ["feddifrc-ssl", "simclr"])
def test_label_free_algorithms_never_touch_labels(algorithm: str) -> None:
    images, _ = _data()
    res = train_local(_model(), images, PoisonLabels(), _algo(algorithm, _targets(), local_epochs=1),
                      "cpu", transform=flip_transform, progress=True)
    assert res.accuracy == 0.0 and "ce" not in res.metrics


def test_supervised_algorithm_without_labels_is_a_clear_error() -> None:
    images, _ = _data()
    with pytest.raises(ValueError, match="labels.*None"):
        train_local(_model(), images, None, _algo("fedavg"), "cpu")


@pytest.mark.parametrize("algorithm", ["feddifrc", "feddifrc-ssl"])
def test_missing_targets_is_a_clear_error(algorithm: str) -> None:
    images, labels = _data()
    with pytest.raises(ValueError, match="needs the client's DiffusionTargets"):
        train_local(_model(), images, labels, _algo(algorithm), "cpu")


def test_targets_of_wrong_size_are_rejected() -> None:
    images, labels = _data()
    t = _targets()
    short = DiffusionTargets(t.positive[:5], t.negatives[:5], t.null[:5])
    with pytest.raises(ValueError, match="one row per image"):
        train_local(_model(), images, labels, _algo("feddifrc", short), "cpu")


def test_distillation_needs_the_teacher_logits_and_follows_them() -> None:
    images, labels = _data()
    with pytest.raises(ValueError, match="distils the teacher's zero-shot logits but none"):
        train_local(_model(), images, labels, _algo("fedavg-kd"), "cpu")
    with pytest.raises(ValueError, match=r"finite \[N=48, C\]"):
        train_local(_model(), images, labels,
                    _algo("fedavg-kd", teacher_logits=_teacher_logits()[:5]), "cpu")
    teacher = _teacher_logits(wrong_every=3)
    said = teacher.argmax(dim=1)

    def agreement(**kw: object) -> float:
        model = _model()
        train_local(model, images, labels, _algo("fedavg-kd", teacher_logits=teacher, **kw),
                    "cpu")
        model.eval()
        with torch.no_grad():
            pred = model(images.float() / 255.0)[1].argmax(dim=1)
        return float((pred == said)[torch.arange(N) % 3 == 2].float().mean())

    # where teacher and labels disagree, the distilled model follows the teacher more often
    assert agreement(kd_weight=8.0) > agreement(kd_weight=0.0)


def test_zero_lambda_skips_the_term() -> None:
    images, labels = _data()
    res = train_local(_model(), images, labels, _algo("feddifrc", _targets(), lambda_ndcr=0.0,
                                                      local_epochs=1), "cpu")
    assert "ndcr" not in res.metrics and "tdcl" in res.metrics
    with pytest.raises(ValueError, match="cannot both be 0"):
        _settings("feddifrc-ssl", lambda_tdcl=0.0, lambda_ndcr=0.0)


def test_fedavg_equals_feddifrc_with_both_lambdas_zero() -> None:
    images, labels = _data()
    a, b = _model(), _model()
    ra = train_local(a, images, labels, _algo("fedavg", local_epochs=2), "cpu")
    rb = train_local(b, images, labels, _algo("feddifrc", _targets(), local_epochs=2,
                                              lambda_tdcl=0.0, lambda_ndcr=0.0), "cpu")
    assert ra.epochs == rb.epochs
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_fedprox_pulls_toward_the_global_model() -> None:
    images, labels = _data()
    init = _model()

    def distance(mu: float) -> float:
        model = copy.deepcopy(init)
        train_local(model, images, labels, _algo("fedprox", proximal_mu=mu), "cpu")
        return sum((p - q).pow(2).sum() for p, q in zip(model.parameters(), init.parameters(),
                                                         strict=True)).item()

    assert distance(10.0) < 0.5 * distance(0.0)


def test_moon_first_round_term_is_log2_without_a_previous_model() -> None:
    images, labels = _data()
    res = train_local(_model(), images, labels, _algo("moon", local_epochs=1, lr=1e-6),
                      "cpu")
    assert res.metrics["moon"] == pytest.approx(0.6931, abs=1e-3)


def test_simclr_requires_a_random_transform() -> None:
    images, _ = _data()
    with pytest.raises(ValueError, match="transform"):
        train_local(_model(), images, None, _algo("simclr"), "cpu")


def test_training_reads_the_run_config_and_its_validation() -> None:
    images, labels = _data()
    cfg = _settings("fedavg", local_epochs=1)
    a, b = _model(), _model()
    ra = train_local(a, images, labels, cfg.new_algorithm(), "cpu")  # seed None = the run seed
    rb = train_local(b, images, labels, cfg.new_algorithm(), "cpu", seed=cfg.seed)
    assert ra.epochs == rb.epochs
    with pytest.raises(ValueError, match="algorithm"):
        RunConfig().replace(algorithm="fedbn")
    with pytest.raises(ValueError, match="tau"):
        RunConfig().replace(tau=0.0)


def test_seedsequence_seed_is_stable_and_separates_keys() -> None:
    assert seedsequence_seed(7, 1, 2) == seedsequence_seed(7, 1, 2)
    assert len({seedsequence_seed(7, r, c) for r in range(5) for c in range(5)}) == 25
    assert seedsequence_seed(7, 1, 2) == 1734722684  # pinned: resumed runs reuse these seeds


def test_evaluate_and_extract_features() -> None:
    images, labels = _data()
    model = _model()
    model.train()
    res = evaluate(model, images, labels, batch_size=10, device="cpu")
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        _, logits = model(images.float() / 255.0)
        model.train()
    acc = (logits.argmax(1) == labels).float().mean().item()
    loss = nn.functional.cross_entropy(logits, labels).item()
    assert res.num_examples == N
    assert res.accuracy == pytest.approx(acc) and res.loss == pytest.approx(loss, rel=1e-5)
    feats = extract_features(model, images, batch_size=7, device="cpu")
    assert feats.shape == (N, D) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, images, None, 10, "cpu")



class CountingLinear(nn.Module):
    """No BatchNorm; counts the samples it trains on."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, C)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen += x.shape[0]
        return x.flatten(1), self.head(x.flatten(1))


def test_trailing_single_sample_batch_is_dropped_but_batch_size_one_works() -> None:
    images, labels = _data()
    images49, labels49 = torch.cat([images, images[:1]]), torch.cat([labels, labels[:1]])
    model = CountingLinear()
    res = train_local(model, images49, labels49, _algo("fedavg", local_epochs=2), "cpu")
    assert res.num_examples == 49 and model.seen == 2 * 48  # 49 = 3 x 16 + 1
    model = CountingLinear()
    train_local(model, images[:5], labels[:5], _algo("fedavg", batch_size=1, local_epochs=1),
                "cpu")
    assert model.seen == 5
    # NT-Xent cannot use a final batch of one image: it is dropped, training runs
    res = train_local(_model(), images49, None, _algo("simclr", local_epochs=1), "cpu",
                      transform=flip_transform)
    assert res.num_examples == 49


def test_with_project_model_and_augmentation() -> None:
    from feddifrc_core.models import build_model
    from feddifrc_core.transforms import TrainAugment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=g)
    aug = TrainAugment.for_dataset("fashion-mnist")
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 10, 8, feature_dim=16, align_head="none")
    t = DiffusionTargets(torch.randn(40, 16), torch.randn(40, 3, 16), torch.randn(40, 16))
    res = train_local(model, images, labels, _algo("feddifrc", t, local_epochs=1), "cpu",
                      transform=aug)
    assert {"ce", "tdcl", "ndcr"} <= set(res.metrics) and math.isfinite(res.loss)
    ev = evaluate(model, images, labels, 16, "cpu", transform=aug.eval)
    assert ev.num_examples == 40 and 0.0 <= ev.accuracy <= 1.0
    assert extract_features(model, images, 16, "cpu", aug.eval).shape == (40, 16)


def test_alignment_losses_act_through_the_align_head_when_present() -> None:
    images, labels = _data()
    plain = _model()
    headed = copy.deepcopy(plain)
    headed.align_head = nn.Linear(D, D)
    head_before = copy.deepcopy(headed.align_head.state_dict())
    train_local(plain, images, labels, _algo("feddifrc", _targets(), local_epochs=1), "cpu",
                flip_transform)
    train_local(headed, images, labels, _algo("feddifrc", _targets(), local_epochs=1), "cpu",
                flip_transform)
    assert not torch.equal(headed.align_head.weight, head_before["weight"])  # the head learned
    assert not torch.equal(plain.head.weight, headed.head.weight)  # and the losses changed
