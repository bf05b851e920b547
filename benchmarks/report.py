"""The table: medians, peaks and ratios against bare transformers measured in the same run, checked against targets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, fields

from .rows import BARE, OURS, POLICY_AND_REFERENCE, REFERENCE_MEMORY, ROWS, ROWS_BY_NAME, TRL, Target
from .workload import Workload

MIB = 2**20


@dataclass(frozen=True)
class Cell:
    """One implementation's result on one row: the seconds of each round's process, and the peak tensor memory (and
    on the reference memory row, the bytes the reference keeps beyond the policy and the policy's unshared part)."""

    rounds: list[list[float]]
    peak_bytes: int
    kept_bytes: int | None = None
    unshared_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(seconds for round_seconds in self.rounds for seconds in round_seconds)

    def round_ratios(self, bare: Cell) -> list[float]:
        """Each round's median / bare's median in the same round."""
        return [
            statistics.median(ours) / statistics.median(theirs)
            for ours, theirs in zip(self.rounds, bare.rounds, strict=True)
        ]

    def time_ratio(self, bare: Cell) -> float:
        """The median over rounds of this round's median / bare's. The cases of a round run back to back, so pairing
        them cancels the machine's slow drift (on a shared 2-core VM, the same forward moved by 10% in minutes)."""
        return statistics.median(self.round_ratios(bare))


Results = dict[str, dict[str, Cell]]  # row name -> implementation -> cell


def ratio(value: float, bare: float) -> float | None:
    return value / bare if bare > 0 else None


def ratio_to_bare(cells: dict[str, Cell], implementation: str, kind: str) -> float | None:
    """`kind` "time": the paired per-round ratio ([`Cell.time_ratio`]); "memory": peak over bare's peak."""
    cell, bare = cells[implementation], cells[BARE]
    return cell.time_ratio(bare) if kind == "time" else ratio(cell.peak_bytes, bare.peak_bytes)


def kept_ratio(cell: Cell) -> float | None:
    """The bytes the reference keeps beyond the policy over the policy's unshared part."""
    return ratio(cell.kept_bytes, cell.unshared_bytes) if cell.unshared_bytes is not None else None


def checks(results: Results) -> list[tuple[str, str, float | None, float]]:
    """`(row, "time" | "memory" | "kept", our ratio, target)` for every target of a measured row: time and memory are
    ratios to bare, kept a ratio to the unshared part ([`kept_ratio`])."""
    found = []
    for row in ROWS:
        cells = results.get(row.name, {})
        if OURS not in cells:
            continue
        for kind in (field.name for field in fields(Target)):
            target = getattr(row.target, kind)
            if target is not None:
                value = kept_ratio(cells[OURS]) if kind == "kept" else ratio_to_bare(cells, OURS, kind)
                found.append((row.name, kind, value, target))
    return found


def _verdict(value: float | None, target: float | None) -> str:
    if value is None:
        return "n/a"
    if target is None:
        return f"{value:.2f}x"
    return f"{value:.2f}x {'PASS' if value <= target else 'MISS'} (<= {target:.2f}x)"


def _milliseconds(seconds: float) -> str:
    milliseconds = seconds * 1000
    return f"{milliseconds:.0f} ms" if milliseconds >= 100 else f"{milliseconds:.3g} ms"


def _mebibytes(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def _compared(trl_label: str | None) -> list[tuple[str, str]]:
    """The implementations compared with bare transformers, with their column names."""
    return [(OURS, "transformers-vhead")] + ([(TRL, trl_label)] if trl_label else [])


def table(results: Results, trl_label: str | None) -> str:
    """A markdown table: for each row the bare median time and peak memory, then ours and TRL's with their ratios."""
    others = _compared(trl_label)
    measures = [("time", "time", "median", _milliseconds), ("memory", "peak", "peak_bytes", _mebibytes)]
    header = ["case"]
    for _, label, _, _ in measures:
        header.append(f"bare {label}")
        for _, name in others:
            header += [f"{name} {label}", "x bare"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ROWS:
        cells = results.get(row.name)
        if not cells:
            continue
        line = [row.name]
        for kind, _, attribute, show in measures:
            line.append(show(getattr(cells[BARE], attribute)))
            for implementation, _ in others:
                if implementation not in cells:
                    line += ["-", "-"]
                    continue
                target = getattr(row.target, kind) if implementation == OURS else None
                value = getattr(cells[implementation], attribute)
                line += [show(value), _verdict(ratio_to_bare(cells, implementation, kind), target)]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def reference_notes(results: Results, workloads: dict[str, Workload], trl_label: str | None) -> str:
    """The reference rows' numbers that are not ratios to bare: what each reference keeps beyond the policy, ours
    against the target, and the layer-count ideal next to our measured time ratio."""
    lines = []
    cells = results.get(REFERENCE_MEMORY)
    if cells:
        kept = []
        for implementation, name in [(BARE, "bare (full copy)"), *_compared(trl_label)]:
            if implementation in cells:
                kept.append(f"{name} {_mebibytes(cells[implementation].kept_bytes)}")
        ours, target = cells[OURS], ROWS_BY_NAME[REFERENCE_MEMORY].target.kept
        lines.append(
            f"- {REFERENCE_MEMORY}, kept beyond the policy: {', '.join(kept)}; transformers-vhead over the unshared "
            f"part ({_mebibytes(ours.unshared_bytes)}): {_verdict(kept_ratio(ours), target)}"
        )
    cells = results.get(POLICY_AND_REFERENCE)
    if cells:
        measured, ideal = ratio_to_bare(cells, OURS, "time"), workloads[POLICY_AND_REFERENCE].one_pass_ideal()
        lines.append(
            f"- {POLICY_AND_REFERENCE}: transformers-vhead {measured:.2f}x bare, the layer-count ideal {ideal:.2f}x"
        )
    return "\n".join(lines)


def spread(results: Results, trl_label: str | None) -> str:
    """How far the time ratios of single rounds strayed: the noise the medians were taken over."""
    lines = []
    for row in ROWS:
        cells = results.get(row.name, {})
        parts = []
        for implementation, name in _compared(trl_label):
            if implementation in cells and len(cells[BARE].rounds) > 1:
                ratios = cells[implementation].round_ratios(cells[BARE])
                parts.append(f"{name} {min(ratios):.2f}-{max(ratios):.2f}x")
        if parts:
            lines.append(f"- {row.name}: {', '.join(parts)}")
    return "\n".join(lines)


def summary(results: Results) -> str:
    """One line: how many targets passed, and which missed by how much."""
    found = checks(results)
    missed = [
        f"{row} {kind} {'n/a' if value is None else f'{value:.2f}x'} > {target:.2f}x"
        for row, kind, value, target in found
        if value is None or value > target
    ]
    text = f"targets: {len(found) - len(missed)} PASS, {len(missed)} MISS"
    return text + (f" ({'; '.join(missed)})" if missed else "")
