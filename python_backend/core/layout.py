"""Row-slab layout of one image across the ranks of a patch group.

The latent is cut into horizontal slabs in rank order. Heights are counted in *units*: one unit is
as many latent rows as the UNet's total downsampling factor, so every feature-map level splits on
whole rows. A rank that owns ``u`` units owns ``u * factor / d`` rows of a map downsampled by ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """The requested split cannot be made; the message names the limit."""


@dataclass(frozen=True)
class PatchLayout:
    units: tuple[int, ...]  # units owned by each rank, in rank (= row) order
    unit_rows: int  # latent rows per unit (the UNet's total downsampling factor)
    index: int = 0  # this rank's position in the patch group

    @classmethod
    def split(cls, latent_height: int, num_patches: int, unit_rows: int, index: int = 0) -> "PatchLayout":
        """Splits ``latent_height`` rows into ``num_patches`` slabs as evenly as whole units allow.

        The first ``units % num_patches`` slabs get one unit more, so heights may be unequal.
        """
        if num_patches < 1:
            raise LayoutError(f"the number of patches must be >= 1, got {num_patches}")
        if latent_height % unit_rows:
            raise LayoutError(
                f"latent height {latent_height} is not a multiple of the UNet's downsampling factor {unit_rows}"
            )
        total_units = latent_height // unit_rows
        if num_patches > total_units:
            raise LayoutError(
                f"{num_patches} patches need at least {num_patches * unit_rows} latent rows "
                f"({num_patches * unit_rows * 8} pixels); this size allows at most {total_units} patches"
            )
        base, extra = divmod(total_units, num_patches)
        units = tuple(base + (1 if r < extra else 0) for r in range(num_patches))
        return cls(units=units, unit_rows=unit_rows, index=index)

    @property
    def num_patches(self) -> int:
        return len(self.units)

    @property
    def latent_height(self) -> int:
        return sum(self.units) * self.unit_rows

    def scaled(self, local_count: int) -> list[int]:
        """Per-rank sizes of anything proportional to the slab (rows at some level, tokens, ...).

        ``local_count`` is this rank's size; every other rank's follows from the unit ratio.
        """
        own = self.units[self.index]
        if local_count % own:
            raise LayoutError(f"local size {local_count} is not a whole multiple of this rank's {own} units")
        per_unit = local_count // own
        return [u * per_unit for u in self.units]

    def row_range(self, full_height: int) -> tuple[int, int]:
        """This rank's rows [start, stop) in a map of ``full_height`` rows (the latent or any level)."""
        total = sum(self.units)
        if full_height % total:
            raise LayoutError(f"map height {full_height} does not split into {total} units")
        per_unit = full_height // total
        start = sum(self.units[: self.index]) * per_unit
        return start, start + self.units[self.index] * per_unit

    def weights(self) -> list[float]:
        """Each slab's share of the elements of any map (for combining GroupNorm statistics)."""
        total = sum(self.units)
        return [u / total for u in self.units]
