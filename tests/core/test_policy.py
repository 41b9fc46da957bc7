"""SavePolicy: every decision of every strategy."""

from __future__ import annotations

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.core.best import BestTracker, MetricRule
from ckpt_callbacks.core.save.policy import SavePolicy


def steps_saved(policy: SavePolicy, total: int) -> list[int]:
    return [step for step in range(1, total + 1) if policy.on_step_end(step)]


def test_steps_strategy_saves_every_n_and_at_the_final_step() -> None:
    policy = SavePolicy(CheckpointArguments(save_steps=4))
    policy.set_max_steps(10)
    assert steps_saved(policy, 10) == [4, 8, 10]


def test_ratio_save_steps_resolve_against_total_steps_like_the_trainer() -> None:
    policy = SavePolicy(CheckpointArguments(save_steps=0.25))
    policy.set_max_steps(10)  # ceil(10 * 0.25) = 3
    assert policy.save_interval == 3
    assert steps_saved(policy, 10) == [3, 6, 9, 10]


def test_ratio_without_known_total_only_saves_on_other_triggers() -> None:
    policy = SavePolicy(CheckpointArguments(save_steps=0.5))
    assert steps_saved(policy, 6) == []


def test_no_strategy_never_saves_but_train_end_is_not_forced() -> None:
    policy = SavePolicy(CheckpointArguments(save_strategy="no"))
    policy.set_max_steps(5)
    assert steps_saved(policy, 5) == [] and not policy.on_epoch_end() and not policy.on_train_end(5)


def test_epoch_strategy_saves_only_at_epoch_end() -> None:
    policy = SavePolicy(CheckpointArguments(save_strategy="epoch"))
    policy.set_max_steps(6)
    assert steps_saved(policy, 6) == [] and policy.on_epoch_end()


def test_best_strategy_saves_exactly_on_new_best() -> None:
    args = CheckpointArguments(save_strategy="best", metric_for_best_model="loss")
    policy = SavePolicy(args, BestTracker(MetricRule("eval_loss", False)))
    decisions = [policy.on_evaluate({"eval_loss": v}, step) for step, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0], 1)]
    assert decisions == [True, True, False, False, True]
    assert not policy.on_evaluate({"eval_other": 0.0}, 6)


def test_time_interval_triggers_after_elapsed_seconds() -> None:
    now = [0.0]
    policy = SavePolicy(CheckpointArguments(save_strategy="no", save_time_interval=10), clock=lambda: now[0])
    assert not policy.on_step_end(1)
    now[0] = 10.5
    assert policy.on_step_end(2)
    policy.record_save(2)
    now[0] = 15.0
    assert not policy.on_step_end(3)


def test_train_end_forces_a_save_unless_this_step_is_saved() -> None:
    policy = SavePolicy(CheckpointArguments(save_steps=100))
    assert policy.on_train_end(7)
    policy.record_save(7)
    assert not policy.on_train_end(7)


def test_saves_during_training_is_false_only_when_no_strategy_and_no_time_interval_can_fire() -> None:
    assert not SavePolicy(CheckpointArguments(save_strategy="no")).saves_during_training
    assert SavePolicy(CheckpointArguments(save_strategy="no", save_time_interval=60)).saves_during_training
    for strategy in ("steps", "epoch"):
        assert SavePolicy(CheckpointArguments(save_strategy=strategy)).saves_during_training
