"""Sample grids as PNG: one panel per guidance strength, one row per class."""
import math
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

_MIN_CELL = 32  # Upscale small images (8x8 digits) so a grid is readable on screen.


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 1, fill: int = 255) -> np.ndarray:
  """uint8 [rows·cols, H, W, C] -> one image [rows(H+pad)+pad, cols(W+pad)+pad, C], row-major."""
  n, h, w, c = images.shape
  if n != rows * cols:
    raise ValueError(f"Cannot tile {n} images into {rows}x{cols}.")
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + k * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def save_panels(path: str, panels: Sequence[np.ndarray], titles: Sequence[str],
                rows: int, cols: int, row_labels: Sequence[str] | None = None) -> None:
  """Writes panels (each uint8 [rows·cols, H, W, C]) side by side, titled, to a PNG at `path`."""
  h = panels[0].shape[1]
  scale = max(1, math.ceil(_MIN_CELL / h))
  font = ImageFont.load_default()
  grids = []
  for panel in panels:
    grid = tile(panel, rows, cols)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    grids.append(grid[..., 0] if grid.shape[-1] == 1 else grid)
  mode = "L" if grids[0].ndim == 2 else "RGB"
  gh, gw = grids[0].shape[:2]
  title_h, label_w, gap = 16, (24 if row_labels else 0), 12
  canvas = Image.new(mode, (label_w + len(grids) * (gw + gap), title_h + gh), 255 if mode == "L" else (255,) * 3)
  draw = ImageDraw.Draw(canvas)
  ink = 0 if mode == "L" else (0, 0, 0)
  for i, (grid, title) in enumerate(zip(grids, titles)):
    left = label_w + i * (gw + gap)
    canvas.paste(Image.fromarray(grid, mode), (left, title_h))
    draw.text((left + 2, 2), title, fill=ink, font=font)
  cell = gh / rows
  for r, label in enumerate(row_labels or ()):
    draw.text((2, title_h + r * cell + cell / 2 - 5), label, fill=ink, font=font)
  with epath.Path(path).open("wb") as f:  # Local paths and gs:// alike.
    canvas.save(f, format="PNG")


def write_sample_grid(path: str, samples: np.ndarray, num_classes: int,
                      guidance: Sequence[float], num_per_class: int) -> None:
  """Saves uint8 samples ordered as `sampler.class_sweep`: a panel per w, a row per class."""
  panels = samples.reshape((len(guidance), num_classes * num_per_class) + samples.shape[1:])
  save_panels(path, panels, [f"w = {w:g}" for w in guidance], rows=num_classes,
              cols=num_per_class, row_labels=[str(i) for i in range(num_classes)])
