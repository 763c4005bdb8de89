"""Listing: E2B's filters (state, metadata, template, started after) and stable pagination."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_kit import record

from cube.store import InvalidQuery, Journal, Phase, SandboxRecord


async def _all_pages(journal: Journal, limit: int, **filters: object) -> list[list[str]]:
    """Every page of a listing, as lists of ids, following the tokens to the end."""
    pages: list[list[str]] = []
    token: str | None = None
    while True:
        page = await journal.list(limit=limit, next_token=token, **filters)  # type: ignore[arg-type]
        pages.append([r.id for r in page.items])
        token = page.next_token
        if token is None:
            return pages


async def _insert_started_at(
    journal: Journal, *times: float, **fields: object
) -> list[SandboxRecord]:
    return [await journal.insert(record(started_at=t, **fields)) for t in times]


async def test_list_returns_every_state_newest_first_by_default(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        made = await _insert_started_at(journal, 1.0, 3.0, 2.0)
        await journal.transition(made[0].id, Phase.KILLED)
        page = await journal.list()
    assert [r.started_at for r in page.items] == [3.0, 2.0, 1.0]
    assert page.next_token is None


async def test_list_in_ascending_order(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        await _insert_started_at(journal, 2.0, 1.0, 3.0)
        page = await journal.list(order="asc")
    assert [r.started_at for r in page.items] == [1.0, 2.0, 3.0]


async def test_list_filters_by_any_of_the_given_states(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        ids = {s: (await journal.insert(record(state=s))).id for s in Phase}
        page = await journal.list(state=["running", Phase.PAUSED])
        none = await journal.list(state=[])
    assert {r.id for r in page.items} == {ids[Phase.RUNNING], ids[Phase.PAUSED]}
    assert none.items == []


async def test_list_metadata_filter_needs_every_pair_and_takes_any_key(tmp_path: Path) -> None:
    wanted = {"user id": "a&b", "app": "prod", 'we"ird.key': "$.x"}
    async with Journal.open(tmp_path / "j.db") as journal:
        match = await journal.insert(record(metadata={**wanted, "extra": "yes"}))
        await journal.insert(record(metadata={"user id": "a&b", "app": "dev"}))
        await journal.insert(record(metadata={"app": "prod"}))
        await journal.insert(record())
        page = await journal.list(metadata=wanted)
        single = await journal.list(metadata={"app": "prod"})
    assert [r.id for r in page.items] == [match.id]
    assert len(single.items) == 2


async def test_list_by_template_matches_its_id_or_its_alias(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        by_id = await journal.insert(record(template="tpl123"))
        by_alias = await journal.insert(record(template="tpl456", alias="python"))
        await journal.insert(record(template="other"))
        assert [r.id for r in (await journal.list(template="tpl123")).items] == [by_id.id]
        assert [r.id for r in (await journal.list(template="python")).items] == [by_alias.id]


async def test_list_started_after_excludes_older_and_equal_start_times(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        await _insert_started_at(journal, 1.0, 2.0, 3.0)
        page = await journal.list(started_after=2.0)
    assert [r.started_at for r in page.items] == [3.0]


async def test_pages_cover_every_record_once_in_order(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        # Ties on started_at are broken by id, so equal start times still page stably.
        made = await _insert_started_at(journal, *[float(i // 3) for i in range(25)])
        pages = await _all_pages(journal, limit=10)
        everything = await journal.list(limit=1000)
    assert [len(p) for p in pages] == [10, 10, 5]
    flat = [i for p in pages for i in p]
    assert flat == [r.id for r in everything.items]
    assert sorted(flat) == sorted(r.id for r in made)


async def test_an_exact_last_page_has_no_next_token(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        await _insert_started_at(journal, 1.0, 2.0, 3.0, 4.0)
        pages = await _all_pages(journal, limit=2)
    assert [len(p) for p in pages] == [2, 2]


async def test_paging_neither_skips_nor_repeats_while_sandboxes_are_created(
    tmp_path: Path,
) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        before = await _insert_started_at(journal, *[float(i) for i in range(1, 13)])
        seen: list[str] = []
        token: str | None = None
        newer = 100.0
        while True:
            page = await journal.list(limit=5, next_token=token, state=["running", "starting"])
            seen += [r.id for r in page.items]
            await journal.insert(record(started_at=newer))  # newer than any page: before it
            newer += 1
            token = page.next_token
            if token is None:
                break
    assert seen == [r.id for r in reversed(before)]


async def test_pagination_applies_the_filters_before_the_limit(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        for i in range(20):
            await journal.insert(record(started_at=float(i), metadata={"odd": str(i % 2)}))
        pages = await _all_pages(journal, limit=4, metadata={"odd": "1"})
    assert [len(p) for p in pages] == [4, 4, 2]


@pytest.mark.parametrize(
    "query",
    [
        {"next_token": "not a token!"},
        {"next_token": "WzEsMl0"},  # base64 of [1,2]: the wrong shape
        {"limit": 0},
        {"order": "sideways"},
        {"state": ["exploded"]},
    ],
)
async def test_a_malformed_query_is_refused(tmp_path: Path, query: dict[str, object]) -> None:
    async with Journal.open(tmp_path / "j.db") as journal:
        with pytest.raises(InvalidQuery):
            await journal.list(**query)  # type: ignore[arg-type]
