"""Where a run's samples come from: a sample sheet, a Space Ranger `outs/` folder, or a HEST-1k download.

Each route ends in the same `SampleSpec` (slide, spot file, µm/px), so `tile` and `generate` treat
them alike. A Visium folder's spots are first written into the run as an `.h5ad` in the slide
image's pixels, because Space Ranger keeps them in full-resolution pixels even when only the
downsampled `hires` image ships.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from hinge_cli.core.files import atomic_path
from hinge_cli.data.bins import POOL_UM, visium_hd_sample
from hinge_cli.data.samples import SampleSpec, visium_sample_id
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.hest import read_hest
from hinge_cli.formats.spaceranger import read_spaceranger, spot_expression, visium_image
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)



def read_sample_sheet(path: Path) -> list[SampleSpec]:
    """Rows of `sample_id, slide[, spots, mpp, layer]`; relative paths are relative to the sheet."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"sample sheet {path} does not exist", f"check the path given to {setting('samples')}")
    if path.is_dir():
        hest = all((path / name).is_dir() for name in ("wsis", "st", "metadata"))
        raise HingeError(f"{setting('samples')} {path} is a folder, not a CSV sample sheet",
                         f"tile a HEST-1k folder with {setting('hest')} {path}" if hest else "give a CSV with columns sample_id,slide,...")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"sample_id", "slide"} <= set(rows[0]):
        raise HingeError(f"sample sheet {path} needs the columns sample_id and slide", "add a header line: sample_id,slide,spots,mpp")
    specs = []
    for n, row in enumerate(rows, start=2):
        def resolve(value: str | None) -> Path | None:
            return (path.parent / value.strip()) if value and value.strip() else None

        mpp = (row.get("mpp") or "").strip()
        try:
            specs.append(SampleSpec(row["sample_id"].strip(), resolve(row["slide"]), resolve(row.get("spots")),
                                    float(mpp) if mpp else None, (row.get("layer") or "").strip() or None))
        except ValueError:
            raise HingeError(f"{path} line {n}: mpp '{mpp}' is not a number", "give micrometres per pixel, e.g. 0.5") from None
    ids = [s.sample_id for s in specs]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise HingeError(f"sample sheet {path} repeats sample ids: {', '.join(duplicated)}", "give every row its own sample_id")
    return specs


def visium_sample(run: Run, outs: Path, image: str | Path = "hires", sample_id: str | None = None) -> SampleSpec:
    """The sample of a Space Ranger `outs/` folder, its spots written to `<run>/inputs/<sample>.h5ad`.

    `image` is the full-resolution image the user has (it ships beside `outs/`), or `hires`/`lowres`
    for the downsampled PNGs inside it; coordinates and µm/px are rescaled to the chosen image.
    """
    sample = sample_id or visium_sample_id(outs)
    chosen = visium_image(Path(outs), image)
    if str(image) in ("hires", "lowres"):
        log.info("%s: using the %s image (%.3g µm/px); give --image FULLRES.tif for sharper patches", sample, image, chosen.mpp)
    data = read_spaceranger(Path(outs))
    spots = spot_expression(data, chosen)
    path = run.input_spots(sample)
    with atomic_path(path) as tmp:
        spots.write_h5ad(tmp)
    log.info("%s: %d spots with counts from %s", sample, spots.n_obs, outs)
    return SampleSpec(sample, chosen.path, path, chosen.mpp, None)


def hest_samples(root: Path, ids: Sequence[str] = ()) -> list[SampleSpec]:
    """The samples of a HEST-1k folder, each with its metadata's µm/px (HEST's slides often lack or misstate it)."""
    return [SampleSpec(s.sample_id, s.slide, s.spots, s.mpp) for s in read_hest(Path(root), list(ids) or None)]


def sample_specs(run: Run, *, slides: Sequence[Path] = (), spots: Path | None = None, sample_id: str | None = None,
                 mpp: float | None = None, sheet: Path | None = None, visium: Path | None = None,
                 image: str | Path = "hires", hest: Path | None = None, ids: Sequence[str] = (),
                 layer: str | None = None, visium_hd: Path | None = None, bin_um: int = 8,
                 pool_um: float = POOL_UM) -> list[SampleSpec]:
    """The samples one `tile` call names, by whichever route the user took (exactly one of them)."""
    routes = [name for name, given in (("slide files", bool(slides)), ("--samples", sheet is not None),
                                       ("--visium", visium is not None), ("--visium-hd", visium_hd is not None),
                                       ("--hest", hest is not None)) if given]
    if len(routes) > 1:
        raise HingeError(f"{' and '.join(routes)} both name samples", "give one of them per call")
    if ids and hest is None:
        raise HingeError(f"{setting('ids')} selects samples of a HEST folder", f"give {setting('hest', 'DIR')} with it")
    if (visium is not None or visium_hd is not None or hest is not None) and (spots is not None or mpp is not None):
        raise HingeError(f"{setting('spots')} and {setting('mpp')} come from the folder with {setting('visium')}, "
                         f"{setting('visium-hd')} or {setting('hest')}", "drop them")
    if visium_hd is not None:
        specs = [visium_hd_sample(run, visium_hd, image, bin_um, pool_um, sample_id)]
    elif visium is not None:
        specs = [visium_sample(run, visium, image, sample_id)]
    elif hest is not None:
        specs = hest_samples(hest, ids)
    elif sheet is not None:
        specs = read_sample_sheet(sheet)
    elif slides:
        if len(slides) > 1 and (spots is not None or sample_id is not None):
            raise HingeError(f"{setting('spots')} and {setting('sample-id')} apply to one slide", f"tile one slide per call, or use {setting('samples')} sheet.csv")
        specs = [SampleSpec(sample_id or Path(s).stem, Path(s), spots, mpp) for s in slides]
    else:
        raise HingeError("no slide given", f"pass slide files, {setting('samples')} sheet.csv, {setting('visium', 'OUTS')} or {setting('hest', 'DIR')}")
    if mpp is not None:
        specs = [s if s.mpp is not None else s._replace(mpp=mpp) for s in specs]
    if layer is not None:
        specs = [s._replace(layer=layer) for s in specs]
    return specs
