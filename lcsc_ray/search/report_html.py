"""`report.html`: one self-contained page of a finished search, readable offline and from any file browser.

The verdict lines come first (what a user needs), then the table, the best-score-vs-trial and
coefficients-vs-step plots, and the sample grids side by side with their titles. Images are inlined as
base64 data URIs, so the page is a single file that can be mailed, attached to a ticket or opened on a
machine without the experiment folder.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from lcsc_ray.atomic import atomic_write

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
ul.verdict li { margin: 0.3em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.plots img { max-width: 49%; } .grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; text-align: center; } figure img { width: 260px; image-rendering: pixelated; }
figcaption { font-weight: 600; margin-bottom: 0.3em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_report_html(path: Path, *, title: str, verdict: Sequence[str], table: str, plots: Sequence[Path],
                      grids: Sequence[tuple[str, Path]]) -> Path:
    """Write the page: `verdict` lines, the full `table` (plain text), `plots`, and `grids` as (title, PNG);
    images that are missing are left out rather than failing the report."""
    plot_tags = "".join(f'<img src="{_data_uri(p)}" alt="{html.escape(Path(p).stem)}">' for p in plots
                        if Path(p).is_file())
    grid_tags = "".join(f'<figure><figcaption>{html.escape(name)}</figcaption><img src="{_data_uri(p)}" '
                        f'alt="samples of {html.escape(name)}"></figure>' for name, p in grids if Path(p).is_file())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            "<h2>Verdict</h2><ul class='verdict'>" + "".join(f"<li>{html.escape(line)}</li>" for line in verdict)
            + "</ul><h2>Sample grids (held-out noise)</h2><div class='grids'>" + grid_tags + "</div>"
            + "<h2>Search</h2><div class='plots'>" + plot_tags + "</div>"
            + f"<h2>Table</h2><pre>{html.escape(table)}</pre></body></html>")
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
