"""PatchReport: what vdm_fast.patch replaced, by kind, and what it left alone, with the reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Replaced:
    """One module now running a vdm_fast op. kind: the op ("group_norm_silu", "rms_norm_silu", "temporal_attention",
    "rel_pos_bias"); path: the module's name in the model; how: the adapter that proved the equivalence."""

    kind: str
    path: str
    how: str


@dataclass(frozen=True)
class Skipped:
    """One candidate left as it was. what: the kind of module ("GroupNorm", "Attention", ...)."""

    what: str
    path: str
    reason: str


@dataclass
class PatchReport:
    """The outcome of vdm_fast.patch(model): printable (str) and as a plain dict (as_dict)."""

    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_patched: int = 0

    def add(self, kind: str, path: str, how: str) -> None:
        self.replaced.append(Replaced(kind, path, how))

    def skip(self, what: str, path: str, reason: str) -> None:
        self.skipped.append(Skipped(what, path, reason))

    @property
    def counts(self) -> dict[str, int]:
        """Replacements per kind, e.g. {"group_norm_silu": 44, "temporal_attention": 10}."""
        return dict(sorted(Counter(r.kind for r in self.replaced).items()))

    @property
    def total(self) -> int:
        return len(self.replaced)

    def as_dict(self) -> dict:
        return {
            "replaced": self.counts,
            "total": self.total,
            "already_patched": self.already_patched,
            "replaced_modules": [asdict(r) for r in self.replaced],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def __str__(self) -> str:
        counts = ", ".join(f"{k}: {n}" for k, n in self.counts.items()) or "nothing"
        lines = [f"vdm_fast.patch: replaced {self.total} ({counts}); skipped {len(self.skipped)}"]
        if self.already_patched:
            lines.append(f"  already patched before this call: {self.already_patched}")
        by_how = Counter((r.kind, r.how) for r in self.replaced)
        for (kind, how), n in sorted(by_how.items()):
            lines.append(f"  {kind:<20} x{n:<4} {how}")
        if self.skipped:
            lines.append("  skipped:")
            lines.extend(f"    {s.path} [{s.what}]: {s.reason}" for s in self.skipped)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchReport(replaced={self.counts}, skipped={len(self.skipped)})"
