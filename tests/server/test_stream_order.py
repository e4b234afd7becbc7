"""IndexOrder, which both streaming routes use: each choice's first chunk goes out only after every
choice before it has sent one (the openai SDK's ``.stream()`` helper finds a choice by its index in the
list it appends to), later chunks of an opened choice at once, and what is held at the stream's end."""

from __future__ import annotations

from qwenkit.server.runs import IndexOrder


def test_a_later_choice_waits_for_the_ones_before_it_then_flows():
    order = IndexOrder()
    assert [order.send(1, "b1"), order.send(1, "b2"), order.send(2, "c1")] == [[], [], []]
    assert order.send(0, "a1") == ["a1", "b1", "b2", "c1"]  # in index order, each choice's in its own
    assert [order.send(2, "c2"), order.send(0, "a2"), order.send(1, "b3")] == [["c2"], ["a2"], ["b3"]]
    assert order.rest() == []


def test_what_waits_on_a_choice_that_never_sends_goes_out_at_the_end_in_order():
    """A choice that failed before its first chunk (its error event is not held) holds back the ones
    after it until the stream ends."""
    order = IndexOrder()
    assert [order.send(3, "d"), order.send(1, "b1"), order.send(1, "b2")] == [[], [], []]
    assert order.rest() == ["b1", "b2", "d"]
    assert order.rest() == []
