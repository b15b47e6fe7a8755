"""The recommender student's model selection sees only a validation split carved out of the training
events (models.recommender_data.validation_split), never the test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from export import distill_recommender as drec
from models import recommender_data as rd


@pytest.fixture(scope="module")
def split() -> rd.Split:
    return rd.leave_one_out(rd.generate(n_users=1000, n_items=300, seed=3))


def test_validation_is_carved_from_training_events_and_leaves_the_test_split_alone(split):
    val = rd.validation_split(split, fraction=0.1, seed=0)
    assert len(val.users) == 100 and len(np.unique(val.users)) == 100
    # The test split is untouched.
    assert np.array_equal(val.train.test_users, split.test_users)
    assert np.array_equal(val.train.test_items, split.test_items)
    # Exactly the validation events left the training events: each chosen user's latest training event.
    assert len(val.train.train_users) == len(split.train_users) - 100
    for user, item in zip(val.users, val.items):
        train_items = split.train_items[split.train_users == user]
        assert item == train_items[-1]
        assert np.array_equal(val.train.train_items[val.train.train_users == user], train_items[:-1])
    # Seeded: the same users again; another seed, other users.
    assert np.array_equal(rd.validation_split(split, fraction=0.1, seed=0).users, val.users)
    assert not np.array_equal(rd.validation_split(split, fraction=0.1, seed=1).users, val.users)
    scored = val.as_test()
    assert np.array_equal(scored.test_items, val.items) and scored.history is split.history
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        rd.validation_split(split, fraction=1.0, seed=0)


def test_the_learning_rate_is_chosen_on_validation(split, monkeypatch):
    # A grid holding a useless rate (0: the student stays at its random start) and a useful one; alpha 0 so
    # that the family's own objective alone drives training (the teacher's scores are then unused). One epoch
    # already separates them (validation HR@10 0.34 against 0.11; 0.37 after five).
    settings = drec.RecKDSettings(epochs=1, batch_size=64, lr_grid=(0.0, 5e-2), alpha=0.0, weight_decay=0.0)
    seen: list[rd.Split] = []
    train = drec.train_student

    def spy(student, data, **kwargs):
        seen.append(data)
        return train(student, data, **kwargs)

    monkeypatch.setattr(drec, "train_student", spy)
    teacher = np.zeros((split.n_users, split.n_items), np.float32)
    lr, figures = drec.choose_lr(split, teacher=teacher, dim=8, settings=settings, seed=0)
    assert lr == 5e-2
    assert figures["users"] == 100 and figures["hr@10"]["0.05"] > figures["hr@10"]["0"]
    # Every candidate trained without the validation events.
    assert len(seen) == 2 and all(len(s.train_users) == len(split.train_users) - 100 for s in seen)
    # A one-point grid is taken as is: nothing trained, nothing to choose.
    one = dataclasses.replace(settings, lr_grid=(1e-2,))
    assert drec.choose_lr(split, teacher=teacher, dim=8, settings=one, seed=0)[0] == 1e-2
    assert len(seen) == 2
