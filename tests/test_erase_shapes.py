"""Behaviour on the shipped model: the removed concept is gone, the rest is kept."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from obliviate.erase import erase
from obliviate.evaluate.attacks import concept_accuracy, naming_prompts
from obliviate.evaluate.softprompt import SoftPromptAttack
from obliviate.request import Request
from obliviate.shapes import vocab

OBJECTS = [c.name for c in vocab.OBJECTS]


def object_accuracies(pipe, judge, n: int = 16) -> dict[str, float]:
    return {o: concept_accuracy(pipe, judge, o, naming_prompts(o, n, seed=11), seed=3) for o in OBJECTS}


@pytest.fixture(scope="module")
def base_accuracy(shapes_pipe, shapes_judge):
    return object_accuracies(shapes_pipe, shapes_judge)


@pytest.mark.parametrize("method", ["uce", "duge", "fewshot-te", "doco"])
def test_star_is_gone_and_the_other_objects_stay(method, shapes_pipe, shapes_judge, base_accuracy,
                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    pipe = copy.deepcopy(shapes_pipe)
    erase(pipe, Request(("star",)), method=method, progress=False)
    after = object_accuracies(pipe, shapes_judge)
    others = [o for o in OBJECTS if o != "star"]
    drop = np.mean([base_accuracy[o] for o in others]) - np.mean([after[o] for o in others])
    assert base_accuracy["star"] >= 0.5, base_accuracy  # the shipped model draws stars
    assert after["star"] <= 0.5 * base_accuracy["star"], after  # at least half of them are gone
    assert drop <= 0.15, (base_accuracy, after)  # the other objects are kept


@pytest.mark.parametrize("method", ["uce", "duge"])
def test_robust_holds_star_against_the_rung_that_undoes_the_plain_method(method, shapes_pipe, shapes_judge,
                                                                         base_accuracy, tmp_path,
                                                                         monkeypatch):
    """`--robust` maps the body's reading of noisy stars to circles (engine.body_edit): the
    neutral-start 2-token rung that brings star back after plain UCE or DUGE
    (test_attacks_robust, docs/benchmarks.md) brings back at most a third as much, and the
    other objects are kept."""
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    pipe = copy.deepcopy(shapes_pipe)
    erase(pipe, Request(("star",)), method=method, robust=True, progress=False)
    attacked = SoftPromptAttack(tokens=2, steps=300, init="neutral").run(pipe, shapes_judge, "star")
    assert attacked["accuracy"] <= 0.25, attacked
    after = object_accuracies(pipe, shapes_judge)
    others = [o for o in OBJECTS if o != "star"]
    assert np.mean([base_accuracy[o] - after[o] for o in others]) <= 0.10, (base_accuracy, after)


def test_the_shipped_sd3_model_draws_the_world_and_uce_removes_star_from_it(tmp_path, monkeypatch):
    """`--model shapes-sd3`: the same world on SD3's layout draws its objects, and a request
    on it removes star and keeps the other objects, as on the UNet model."""
    from obliviate import load_pipeline
    from obliviate.evaluate.evaluation import load_judge

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    pipe = load_pipeline("shapes-sd3")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    judge = load_judge(pipe)
    before = object_accuracies(pipe, judge)
    assert np.mean(list(before.values())) >= 0.85 and before["star"] >= 0.5, before
    erase(pipe, Request(("star",)), method="uce", progress=False)
    after = object_accuracies(pipe, judge)
    others = [o for o in OBJECTS if o != "star"]
    drop = np.mean([before[o] for o in others]) - np.mean([after[o] for o in others])
    assert after["star"] <= 0.5 * before["star"], after
    assert drop <= 0.15, (before, after)
