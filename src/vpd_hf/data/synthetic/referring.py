"""Referring expressions of the synthetic scenes: every unambiguous description of each visible object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .scene import COLOR_PALETTE, OBJECT_KINDS, REFERRING_DEPTH_MARGIN, REFERRING_X_MARGIN

if TYPE_CHECKING:
    from .render import ObjectRecord

_RELATIONS = (None, "left", "right", "nearest", "farthest")


@dataclass(frozen=True)
class ReferringQuery:
    """A referring expression as a predicate: attribute filters plus an optional spatial relation.

    An object satisfies it when it has every given attribute and, with a relation, beats every *other* visible object
    with those attributes by the margin: for "left" its centroid x is smaller by at least
    :data:`REFERRING_X_MARGIN` x image width ("right" larger), for "nearest" its centre z-depth smaller by at least
    :data:`REFERRING_DEPTH_MARGIN` metres ("farthest" larger). At most one object can satisfy a relation.
    """

    size: str | None = None
    color: str | None = None
    kind: str | None = None
    relation: str | None = None

    def matches_attributes(self, record: ObjectRecord) -> bool:
        return (
            (self.size is None or record.size == self.size)
            and (self.color is None or record.color == self.color)
            and (self.kind is None or record.kind == self.kind)
        )

    def satisfied_by(self, record: ObjectRecord, candidates: Sequence[ObjectRecord], image_width: int) -> bool:
        """Whether `record` satisfies the query among the visible objects `candidates`."""
        if not self.matches_attributes(record):
            return False
        if self.relation is None:
            return True
        others = [c for c in candidates if c.instance_id != record.instance_id and self.matches_attributes(c)]
        if self.relation in ("left", "right"):
            margin = REFERRING_X_MARGIN * image_width
            sign = 1.0 if self.relation == "left" else -1.0
            return all(sign * (o.centroid[0] - record.centroid[0]) >= margin for o in others)
        sign = 1.0 if self.relation == "nearest" else -1.0
        return all(sign * (o.depth - record.depth) >= REFERRING_DEPTH_MARGIN for o in others)

    def text(self, num_matching: int) -> str:
        """The English expression; `num_matching` (objects with the attributes) picks "on the left" (2) or
        "leftmost" (3 or more)."""
        noun = " ".join(w for w in (self.size, self.color, self.kind or "object") if w)
        if self.relation in ("left", "right"):
            return f"the {noun} on the {self.relation}" if num_matching == 2 else f"the {self.relation}most {noun}"
        if self.relation in ("nearest", "farthest"):
            return f"the {self.relation} {noun}"
        return f"the {noun}"


def referring_expressions(records: Sequence[ObjectRecord], image_width: int) -> dict[int, tuple[str, ...]]:
    """Unambiguous referring expressions of every visible object.

    Each candidate expression (any subset of size / colour / kind, with or without a relation) is kept for an object
    only when exactly one visible object -- that one -- satisfies its :class:`ReferringQuery`. A relation is only used
    when at least two visible objects share the attributes (otherwise it would add nothing), an expression needs at
    least one attribute or a relation ("the object" alone says nothing), and an expression is dropped when a kept one
    for the same object is it with some size / colour / relation words removed ("the small red box" goes when "the
    red box" is kept).

    Returns:
        `{instance_id: expressions}` for every visible object, expressions ordered from the shortest.
    """
    visible = [r for r in records if r.visible]
    # Only attribute values that some visible object has can select anything; skipping the rest changes nothing.
    sizes, colors, kinds = ({getattr(r, name) for r in visible} | {None} for name in ("size", "color", "kind"))
    queries = [q for q in _ALL_QUERIES if q.size in sizes and q.color in colors and q.kind in kinds]
    kept: dict[int, list[ReferringQuery]] = {r.instance_id: [] for r in visible}
    for query in queries:
        matching = [r for r in visible if query.matches_attributes(r)]
        if not matching or (query.relation is not None and len(matching) < 2):
            continue
        winners = [r for r in matching if query.satisfied_by(r, visible, image_width)]
        if len(winners) != 1:
            continue
        # Drop padded forms: "the small red box" when "the red box" already works. The noun is exempt ("the red
        # box" stays next to "the red object"), as people name the kind even when the colour alone would do.
        if not any(_is_reduction(shorter, query) for shorter in kept[winners[0].instance_id]):
            kept[winners[0].instance_id].append(query)
    texts: dict[int, tuple[str, ...]] = {}
    for instance_id, instance_queries in kept.items():
        texts[instance_id] = tuple(q.text(sum(q.matches_attributes(r) for r in visible)) for q in instance_queries)
    return texts


def _query_words(query: ReferringQuery) -> int:
    return sum(x is not None for x in (query.size, query.color, query.kind, query.relation))


# Every candidate expression, shortest first so that the redundancy check sees the shorter forms before the longer
# ones (the sort is stable, so the order is fixed). The bare "the object" is left out: it says nothing.
_ALL_QUERIES: tuple[ReferringQuery, ...] = tuple(
    sorted(
        (
            ReferringQuery(size, color, kind, relation)
            for size in (None, "small", "large")
            for color in (None, *COLOR_PALETTE)
            for kind in (None, *OBJECT_KINDS)
            for relation in _RELATIONS
            if not (size is None and color is None and kind is None and relation is None)
        ),
        key=_query_words,
    )
)


def _is_reduction(shorter: ReferringQuery, longer: ReferringQuery) -> bool:
    """Whether `shorter` is `longer` with some of its size / colour / relation dropped (same noun)."""
    return (
        shorter != longer
        and shorter.kind == longer.kind
        and shorter.size in (None, longer.size)
        and shorter.color in (None, longer.color)
        and shorter.relation in (None, longer.relation)
    )
