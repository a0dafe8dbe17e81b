"""The tissue mask of the shipped real slide, for docs/images/cmu1_tissue_mask.png: the slide's
1/8 thumbnail beside the mask `moma tile` computes (the band tests/test_real_slide.py accepts was
read off this figure).

    python scripts/slide_mask_figure.py [--out docs/images/cmu1_tissue_mask.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moma.data.slides import Slide  # noqa: E402
from moma.data.tiling import tissue_mask  # noqa: E402
from moma.utils.io import atomic_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SVS = ROOT / "data" / "slides" / "CMU-1-Small-Region.svs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "cmu1_tissue_mask.png")
    args = parser.parse_args()
    with Slide(SVS) as slide:
        thumb = slide.thumbnail(8)
    mask = tissue_mask(thumb)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 4.4))
    axes[0].imshow(thumb)
    axes[0].set_title("CMU-1-Small-Region, 1/8", fontsize=9)
    axes[1].imshow(mask, cmap="gray")
    axes[1].set_title(f"tissue mask: {mask.mean():.1%} of the slide", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(f"{args.out}: tissue {mask.mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
