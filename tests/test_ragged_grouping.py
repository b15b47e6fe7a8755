"""Length-aware grouping (service/length_groups.py): the waiting requests are cut into groups by sorted length
within the padding budget and the token bound. Which group goes: tests/test_length_groups_round5.py.

Driven through the real AdmissionQueue with made-up arrival times and lengths:
every batch follows from the rules alone, no clock or timing is involved.
"""

from __future__ import annotations

from service.length_groups import length_groups
from tests.ragged_requests import text_queue


async def test_groups_follow_sorted_length_and_the_padding_budget():
    _, reqs = text_queue([40, 10, 12, 13, 41, 90])
    groups = length_groups(reqs, max_rows=8, max_padding=4)
    # 10 -> 12 pads one row by 2; 13 pads two rows by 1; 40 would pad three rows by 27: a new group.
    assert [[r.length for r in g.members] for g in groups] == [[10, 12, 13], [40, 41], [90]]
    assert [g.rows for g in groups] == [3, 2, 1]


async def test_no_budget_yet_stacks_equal_lengths_only():
    _, reqs = text_queue([10, 11, 10, 11])
    groups = length_groups(reqs, max_rows=8, max_padding=0)
    assert [[r.length for r in g.members] for g in groups] == [[10, 10], [11, 11]]


async def test_a_group_cut_by_the_token_bound_is_reported_full():
    queue, _ = text_queue([10, 10, 10])
    _, rows = queue.compatible(max_rows=8, by_length=True, max_padding=0, max_tokens=20)
    assert rows == 2 and queue.token_bound_hit  # a third row of 10 tokens would make 30 > 20
    queue, _ = text_queue([10, 10])
    queue.compatible(max_rows=8, by_length=True, max_padding=0, max_tokens=20)
    assert queue.token_bound_hit  # no third row of any length fits: waiting for one is pointless
    queue, _ = text_queue([10])
    queue.compatible(max_rows=8, by_length=True, max_padding=0, max_tokens=20)
    assert not queue.token_bound_hit  # a second row of up to 10 tokens would fit
