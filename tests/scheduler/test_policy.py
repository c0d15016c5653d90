from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from routerd.scheduler.policy import (
    Loaded,
    choose_victims,
    eviction_order,
    fits_at_all,
    refusal_message,
    resource_label,
)
from routerd.units import human_bytes

GB = 1 << 30
GPU24 = {"ram": 64 * GB, "gpu0": 24 * GB}


def model(name: str, gpu: int = 0, ram: int = 1, *, busy: int = 0, t: float = 0.0,
          pinned: bool = False) -> Loaded:
    return Loaded(name, {"ram": ram * GB, "gpu0": gpu * GB}, busy, t, pinned)


def gpu(n: int, ram: int = 1) -> dict[str, int]:
    return {"ram": ram * GB, "gpu0": n * GB}


def names(victims: Sequence[Loaded] | None) -> list[str] | None:
    return None if victims is None else [v.name for v in victims]


# --- examples after Ollama's sched_test: a fake 24 GB GPU --------------------------

def test_empty_gpu_fits_at_once() -> None:
    assert choose_victims(gpu(4), [], GPU24) == []


def test_fits_beside_loaded_models() -> None:
    loaded = [model("a", 8, t=1), model("b", 12, t=2)]
    assert choose_victims(gpu(4), loaded, GPU24) == []


def test_evicts_least_recently_used() -> None:
    loaded = [model("b", 8, t=2), model("a", 8, t=1), model("c", 4, t=3)]
    assert names(choose_victims(gpu(8), loaded, GPU24)) == ["a"]


def test_skips_busy_models() -> None:
    loaded = [model("a", 8, t=1, busy=1), model("b", 12, t=2)]
    assert names(choose_victims(gpu(8), loaded, GPU24)) == ["b"]


def test_all_busy_means_wait() -> None:
    loaded = [model("a", 12, t=1, busy=1), model("b", 12, t=2, busy=3)]
    assert choose_victims(gpu(4), loaded, GPU24) is None


def test_too_large_for_the_gpu_is_refused() -> None:
    assert not fits_at_all(gpu(30), GPU24)
    assert choose_victims(gpu(30), [], GPU24) is None
    assert fits_at_all(gpu(24), GPU24)
    assert refusal_message(gpu(30), GPU24, "llama3:70b") == \
        "llama3:70b needs 30.0 GiB GPU 0 memory but the budget is 24.0 GiB"


def test_several_victims_when_one_is_not_enough() -> None:
    loaded = [model("a", 8, t=1), model("b", 8, t=2), model("c", 8, t=3)]
    assert names(choose_victims(gpu(16), loaded, GPU24)) == ["a", "b"]


def test_victims_made_redundant_are_spared() -> None:
    loaded = [model("small", 2, t=1), model("big", 12, t=2), model("busy", 8, t=3, busy=1)]
    # LRU takes "small" first, but "big" alone is enough, so "small" stays.
    assert names(choose_victims(gpu(12), loaded, GPU24)) == ["big"]


def test_pinned_models_go_last() -> None:
    loaded = [model("pinned", 12, t=1, pinned=True), model("b", 12, t=5)]
    assert names(choose_victims(gpu(12), loaded, GPU24)) == ["b"]
    busy_b = [model("pinned", 12, t=1, pinned=True), model("b", 12, t=5, busy=1)]
    assert names(choose_victims(gpu(12), busy_b, GPU24)) == ["pinned"]
    busy_pinned = [model("pinned", 12, t=1, pinned=True, busy=1), model("b", 12, t=5, busy=1)]
    assert choose_victims(gpu(12), busy_pinned, GPU24) is None


def test_ram_only_models_do_not_help_a_gpu_shortage() -> None:
    loaded = [model("cpu-only", 0, ram=30, t=0), model("a", 20, t=1)]
    assert names(choose_victims(gpu(8), loaded, GPU24)) == ["a"]


def test_ram_shortage_evicts_ram_holders() -> None:
    budget = {"ram": 16 * GB}
    loaded = [Loaded("a", {"ram": 6 * GB}, 0, 1, False), Loaded("b", {"ram": 6 * GB}, 0, 2, False)]
    assert names(choose_victims({"ram": 6 * GB}, loaded, budget)) == ["a"]
    assert refusal_message({"ram": 3_328_599_654}, {"ram": 2 * GB}) == \
        "model needs 3.1 GiB RAM but the budget is 2.0 GiB"


def test_ties_evict_the_larger_first() -> None:
    loaded = [model("small", 4, t=1), model("large", 8, t=1), model("new", 10, t=2)]
    assert names(choose_victims(gpu(6), loaded, GPU24)) == ["large"]


def test_count_limit() -> None:
    loaded = [model("a", 1, t=2), model("b", 1, t=1), model("c", 1, t=3)]
    assert names(choose_victims(gpu(1), loaded, GPU24, max_loaded=3)) == ["b"]
    assert names(choose_victims(gpu(1), loaded, GPU24, max_loaded=2)) == ["b", "a"]
    assert choose_victims(gpu(1), loaded, GPU24, max_loaded=4) == []
    busy = [model("a", 1, busy=1)]
    assert choose_victims(gpu(1), busy, GPU24, max_loaded=1) is None


def test_count_limit_with_gpu_only_helpers() -> None:
    # The count limit makes any idle model useful, even one holding no short resource.
    loaded = [model("cpu", 0, t=1), model("g", 20, t=2)]
    assert names(choose_victims(gpu(8), loaded, GPU24, max_loaded=2)) == ["g"]
    assert names(choose_victims(gpu(2), loaded, GPU24, max_loaded=2)) == ["cpu"]


def test_missing_budget_resource_counts_as_zero() -> None:
    assert not fits_at_all({"gpu1": 1}, {"ram": 10})
    assert fits_at_all({"gpu1": 0, "ram": 10}, {"ram": 10})
    assert "GPU 1 memory" in refusal_message({"gpu1": GB}, {"ram": 10})


def test_human_units() -> None:
    assert human_bytes(512, binary=True) == "512 B"
    assert human_bytes(5 << 20, binary=True) == "5.0 MiB"
    assert human_bytes(3 * GB // 2, binary=True) == "1.5 GiB"
    assert resource_label("ram") == "RAM" and resource_label("gpu3") == "GPU 3 memory"
    assert resource_label("npu") == "npu"
    assert refusal_message(gpu(2), GPU24) == "model fits the budget"


# --- properties ---------------------------------------------------------------------

RES = ("ram", "gpu0")
amounts = st.integers(0, 12)
needs = st.fixed_dictionaries({r: amounts for r in RES})
models = st.builds(
    lambda i, need, busy, t, pinned: Loaded(f"m{i}", need, busy, float(t), pinned),
    st.integers(), needs, st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 5), st.booleans(),
)
loaded_lists = st.lists(models, max_size=7).map(
    lambda ms: [Loaded(f"m{i}", m.need, m.in_use, m.last_used, m.pinned) for i, m in enumerate(ms)])
budgets = st.fixed_dictionaries({r: st.integers(0, 40) for r in RES})


def fits(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
         victims: Sequence[Loaded], max_loaded: int) -> bool:
    rest = [m for m in loaded if all(m is not v for v in victims)]
    if max_loaded and len(rest) + 1 > max_loaded:
        return False
    return all(sum(m.need.get(r, 0) for m in rest) + need.get(r, 0) <= budget.get(r, 0) for r in RES)


@settings(max_examples=400, deadline=None)
@given(needs, loaded_lists, budgets, st.integers(0, 5))
def test_properties(need: dict[str, int], loaded: list[Loaded], budget: dict[str, int],
                    max_loaded: int) -> None:
    victims = choose_victims(need, loaded, budget, max_loaded=max_loaded)
    idle = [m for m in loaded if m.in_use == 0]
    if victims is None:
        # Only when even evicting every idle model would not make room.
        assert not fits(need, loaded, budget, idle, max_loaded)
        return
    assert all(v.in_use == 0 for v in victims), "evicted a busy model"
    assert len({v.name for v in victims}) == len(victims)
    assert fits(need, loaded, budget, victims, max_loaded), "result does not fit"
    assert (victims == []) == fits(need, loaded, budget, [], max_loaded)
    for v in victims:  # minimal: no victim can be spared
        rest = [x for x in victims if x is not v]
        assert not fits(need, loaded, budget, rest, max_loaded), f"{v.name} was not needed"
    order = eviction_order(loaded)
    assert victims == [m for m in order if any(m is v for v in victims)], "not in LRU order"
    if any(v.pinned for v in victims):  # pinned only when the unpinned cannot make room
        unpinned = [m for m in idle if not m.pinned]
        assert not fits(need, loaded, budget, unpinned, max_loaded)


@settings(max_examples=200, deadline=None)
@given(needs, loaded_lists, budgets)
def test_unhelpful_models_are_never_evicted(need: dict[str, int], loaded: list[Loaded],
                                            budget: dict[str, int]) -> None:
    victims = choose_victims(need, loaded, budget) or []
    used = {r: sum(m.need[r] for m in loaded) for r in RES}
    short = {r for r in RES if used[r] + need[r] > budget[r]}
    for v in victims:
        assert any(v.need[r] > 0 for r in short)


@settings(max_examples=200, deadline=None)
@given(needs, budgets)
def test_fits_at_all_matches_an_empty_machine(need: dict[str, int], budget: dict[str, int]) -> None:
    assert fits_at_all(need, budget) == (choose_victims(need, [], budget) == [])


def test_fits_alongside_counts_everything_still_holding_memory() -> None:
    from routerd.scheduler.policy import fits_alongside

    a = Loaded("a", {"ram": 6 * GB}, 0, 1, False)
    assert fits_alongside({"ram": 6 * GB}, [a], {"ram": 12 * GB})
    assert not fits_alongside({"ram": 6 * GB}, [a], {"ram": 12 * GB}, {"ram": 1})
    assert not fits_alongside({"ram": 7 * GB}, [a], {"ram": 12 * GB})


def test_fits_alongside_never_overlaps_on_an_unmeasured_resource() -> None:
    """A GPU routerd cannot measure (no NVML) may not hold two engines at once."""
    from routerd.scheduler.policy import fits_alongside

    a = Loaded("a", {"ram": GB, "gpu0": 2 * GB}, 0, 1, False)
    assert not fits_alongside({"ram": GB}, [a], {"ram": 12 * GB})
    assert not fits_alongside({"ram": GB, "gpu0": GB}, [], {"ram": 12 * GB})
    assert fits_alongside({"ram": GB, "gpu0": GB}, [a], {"ram": 12 * GB, "gpu0": 8 * GB})
