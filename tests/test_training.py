"""The training loop (checkpoints, exact resume) and the store of trained artifacts."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch

from editkit.training import (
    ArtifactError,
    ArtifactKey,
    MissingArtifactError,
    Trainable,
    fit,
    load_artifact,
    save_artifact,
)


class Regression(Trainable):
    """Fit y = 3x - 1 with noise drawn from the (checkpointed) random streams."""

    def __init__(self, steps: int) -> None:
        self.module = torch.nn.Linear(1, 1)
        self.steps = steps
        self.grad_clip = 10.0

    def param_groups(self):
        return [{"params": list(self.module.parameters()), "lr": 0.2}]

    def sample(self, rng: random.Random):
        x = torch.tensor([[rng.uniform(-1, 1)] for _ in range(8)])
        return x, 3 * x - 1 + 0.01 * torch.randn_like(x)

    def loss(self, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.module(x), y)
        return loss, {"mse": loss.item()}

    def validate(self):
        return {"slope": float(self.module.weight)}


class Interrupted(Regression):
    def __init__(self, steps: int, stop_at: int) -> None:
        super().__init__(steps)
        self.stop_at = stop_at
        self.calls = 0

    def loss(self, batch):
        self.calls += 1
        if self.calls > self.stop_at:
            raise KeyboardInterrupt
        return super().loss(batch)


def test_fit_lowers_the_loss_and_validates_at_checkpoints(tmp_path):
    torch.manual_seed(123)
    trainable = Regression(steps=60)
    history = fit(trainable, tmp_path, seed=1, checkpoint_every=20, progress=False)
    assert len(history) == 60 and history[-1]["loss"] < history[0]["loss"] / 10
    assert [h["step"] for h in history if "val_slope" in h] == [20, 40, 60]
    assert abs(history[-1]["val_slope"] - 3) < 0.5
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 60


def test_resume_gives_bit_identical_weights(tmp_path):
    torch.manual_seed(0)
    straight = Regression(steps=30)
    init = {k: v.clone() for k, v in straight.module.state_dict().items()}
    fit(straight, tmp_path / "a", seed=5, checkpoint_every=10, progress=False)

    broken = Interrupted(steps=30, stop_at=25)
    broken.module.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        fit(broken, tmp_path / "b", seed=5, checkpoint_every=10, progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 20
    again = Regression(steps=30)
    fit(again, tmp_path / "b", seed=5, checkpoint_every=10, progress=False)
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[name]), name


def test_checkpoint_of_another_run_is_refused(tmp_path):
    fit(Regression(steps=4), tmp_path, seed=0, checkpoint_every=2, fingerprint={"digest": "a"}, progress=False)
    with pytest.raises(ArtifactError, match="another training run"):
        fit(Regression(steps=8), tmp_path, seed=0, checkpoint_every=2, fingerprint={"digest": "b"}, progress=False)


def test_non_finite_loss_stops_training(tmp_path):
    class Exploding(Regression):
        def loss(self, batch):
            return torch.tensor(float("nan"), requires_grad=True), {}

    with pytest.raises(FloatingPointError, match="NaN|nan"):
        fit(Exploding(steps=3), tmp_path, progress=False)


def key(**changes) -> ArtifactKey:
    values = dict(method="toy", model="tiny/model", data="counterfact", data_digest="d1", digest="p1",
                  command="python -m editkit train toy --model tiny/model")
    values.update(changes)
    return ArtifactKey(**values)


def test_artifacts_round_trip_and_name_their_settings(tmp_path):
    module = torch.nn.Linear(3, 2)
    folder = save_artifact(key(), module, {"steps": 7}, root=tmp_path)
    assert folder.parent.name == "tiny--model" and folder.name == "counterfact-d1-p1"
    fresh = torch.nn.Linear(3, 2)
    meta = load_artifact(key(), fresh, root=tmp_path)
    assert meta["steps"] == 7
    assert torch.equal(fresh.weight, module.weight) and torch.equal(fresh.bias, module.bias)


def test_missing_artifact_says_how_to_train(tmp_path):
    with pytest.raises(MissingArtifactError, match="python -m editkit train toy --model tiny/model"):
        load_artifact(key(digest="other"), torch.nn.Linear(3, 2), root=tmp_path)


def test_corrupted_or_mismatched_artifacts_are_refused(tmp_path):
    folder = save_artifact(key(), torch.nn.Linear(3, 2), root=tmp_path)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        load_artifact(key(), torch.nn.Linear(3, 2), root=tmp_path)

    folder = save_artifact(key(), torch.nn.Linear(3, 2), root=tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "data_digest": "elsewhere"}))
    with pytest.raises(ArtifactError, match="other settings"):
        load_artifact(key(), torch.nn.Linear(3, 2), root=tmp_path)

    save_artifact(key(), torch.nn.Linear(3, 2), root=tmp_path)
    with pytest.raises(ArtifactError, match="does not fit"):
        load_artifact(key(), torch.nn.Linear(4, 2), root=tmp_path)


def test_data_digest_is_that_of_the_training_files():
    """Artifact folders are named by this digest: it must stay what it was for the same files."""
    from editkit.datasets import data_checksums
    from editkit.training import data_digest

    def digest(sums):
        return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:12]

    counterfact = {**data_checksums("counterfact", "train"), **data_checksums("counterfact", "val")}
    assert data_digest("counterfact") == digest(counterfact)
    assert data_digest("zsre") == digest(data_checksums("zsre", "train"))
    with pytest.raises(ValueError, match="known: counterfact, zsre"):
        data_digest("mquake")


def test_zsre_training_data_splits_the_train_file_900_100():
    from editkit.datasets import load_zsre
    from editkit.training import training_data

    train, val, _ = training_data("zsre", 5, 3)
    records = load_zsre("train", on_invalid="skip")
    assert train == records[:5] and val == records[900:903]
