"""The replica policy (routerd/peers/replicas.py): a pure function, no I/O."""

from __future__ import annotations

from routerd.peers.replicas import Place, choose


def test_a_loaded_place_with_a_free_slot_wins_over_a_busy_one() -> None:
    busy = Place("local", local=True, loaded=True, slots=1, inflight=1)
    free = Place("b", loaded=True, slots=1, inflight=0)
    assert choose([busy, free]) == free


def test_among_free_places_the_least_busy_per_slot_wins_and_ties_go_local() -> None:
    a = Place("a", loaded=True, slots=4, inflight=1)
    b = Place("b", loaded=True, slots=2, inflight=1)
    assert choose([a, b]) == a
    local = Place("local", local=True, loaded=True, slots=4, inflight=1)
    assert choose([a, local]) == local


def test_weight_shares_the_load() -> None:
    light = Place("a", loaded=True, slots=4, inflight=2, weight=1)
    heavy = Place("b", loaded=True, slots=4, inflight=2, weight=3)
    assert choose([light, heavy]) == heavy


def test_when_every_slot_is_busy_the_shortest_queue_wins() -> None:
    a = Place("a", loaded=True, slots=1, inflight=3)
    b = Place("b", loaded=True, slots=1, inflight=2)
    assert choose([a, b]) == b


def test_a_queue_a_whole_round_deep_spills_over_to_a_place_where_it_fits() -> None:
    loaded = Place("a", loaded=True, slots=1, inflight=2)
    room = Place("local", local=True, fits=True)
    assert choose([loaded, room]) == room
    shallow = Place("a", loaded=True, slots=2, inflight=2)
    assert choose([shallow, room]) == shallow  # one waiting of two slots: stay loaded


def test_nothing_loaded_goes_where_it_fits_else_a_local_load() -> None:
    no_room = Place("b")
    room = Place("c", fits=True)
    local = Place("local", local=True)
    assert choose([no_room, room, local]) == room
    assert choose([no_room, local]) == local


def test_peers_only_and_nothing_loaded_goes_to_the_least_busy() -> None:
    a, b = Place("a", inflight=2), Place("b", inflight=1)
    assert choose([a, b]) == b


def test_no_place_is_none() -> None:
    assert choose([]) is None


def test_32_requests_alternate_over_two_single_slot_replicas() -> None:
    counts = {"a": 0, "b": 0}
    inflight = {"a": 0, "b": 0}
    for _ in range(32):
        p = choose([Place(k, loaded=True, slots=1, inflight=n) for k, n in inflight.items()])
        assert p is not None
        inflight[p.key] += 1
        counts[p.key] += 1
    assert counts == {"a": 16, "b": 16}


def test_a_place_with_requests_in_flight_counts_as_loaded_so_spill_over_does_not_pile_up() -> None:
    busy = Place("a", loaded=True, slots=1, inflight=2)
    spilled = Place("b", fits=True, inflight=1)  # its poll has not seen the load yet
    assert choose([busy, spilled]) == spilled  # loaded now, and the shorter queue
    other = Place("c", fits=True)
    assert choose([busy, spilled, other]) == other  # every slot busy: the next new place
