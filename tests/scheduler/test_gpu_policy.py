"""Eviction per GPU (pure policy): room on one GPU is made by models on that GPU only."""

from __future__ import annotations

from routerd.scheduler.policy import Loaded, choose_victims, refusal_message

GiB = 1 << 30
BUDGET = {"ram": 64 * GiB, "gpu0": 12 * GiB, "gpu1": 12 * GiB}


def m(name: str, last: float, in_use: int = 0, **need: int) -> Loaded:
    return Loaded(name, {"ram": GiB, **{k: v * GiB for k, v in need.items()}}, in_use, last,
                  False)


def test_freeing_gpu1_never_evicts_a_model_only_on_gpu0() -> None:
    loaded = [m("old-on-0", 1, gpu0=6), m("on-1", 2, gpu1=8), m("new-on-0", 3, gpu0=5)]
    victims = choose_victims({"ram": GiB, "gpu1": 6 * GiB}, loaded, BUDGET)
    assert [v.name for v in victims or []] == ["on-1"]


def test_a_split_model_frees_room_on_both_its_gpus() -> None:
    loaded = [m("split", 1, gpu0=7, gpu1=7), m("on-0", 2, gpu0=4)]
    victims = choose_victims({"ram": GiB, "gpu0": 6 * GiB}, loaded, BUDGET)
    assert [v.name for v in victims or []] == ["split"]  # LRU among those holding gpu0


def test_only_as_many_as_the_gpu_needs() -> None:
    loaded = [m("a", 1, gpu0=4), m("b", 2, gpu0=4), m("c", 3, gpu0=3)]
    victims = choose_victims({"ram": GiB, "gpu0": 4 * GiB}, loaded, BUDGET)
    assert [v.name for v in victims or []] == ["a"]


def test_busy_models_on_the_gpu_make_it_wait() -> None:
    loaded = [m("busy", 1, in_use=1, gpu1=10), m("idle-on-0", 0, gpu0=10)]
    assert choose_victims({"ram": GiB, "gpu1": 6 * GiB}, loaded, BUDGET) is None


def test_refusal_names_the_gpu() -> None:
    msg = refusal_message({"ram": GiB, "gpu1": 20 * GiB}, BUDGET, "big")
    assert msg == "big needs 20.0 GiB GPU 1 memory but the budget is 12.0 GiB"
