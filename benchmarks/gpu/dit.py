"""Part 4 (hook): the DiT presets (SD3, FLUX). Not measured yet: the project has no DiT presets so far.

To add them once ``controlnext.bench.presets`` has DiT presets: list their names in ``DIT_PRESETS`` (e.g.
``("sd3-1024", "flux-1024")``) and return :func:`inference.eager_items`-style items for them from :func:`items`; the
kit then runs this part in a worker with its own budget (``BUDGETS["dit"]`` in kit.py) like the other parts.
"""

from __future__ import annotations

from typing import Any

from common import NOT_YET, markdown_table, status_cell

DIT_PRESETS: tuple[str, ...] = ()  # names of controlnext.bench presets for DiT models (sd3/flux), when they exist


def records() -> list[dict[str, Any]]:
    """The part's rows while it has no presets: one 'not yet' row saying so."""
    return [
        dict(
            part="dit",
            item="sd3 / flux presets",
            status=NOT_YET,
            error="no DiT presets in controlnext.bench.presets yet; add them to DIT_PRESETS (benchmarks/gpu/dit.py)",
        )
    ]


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(["measurement", "status"], [[r["item"], status_cell(r)] for r in rows])
