"""Write the offline page template for `dvc plots`: ``python -m scripts.offline_plots_template``.

DVC's default page loads Vega from a CDN, so without a network it shows nothing. This
writes ``.dvc/plots/offline.html`` with Vega, Vega-Lite and Vega-Embed inlined (bundled by
vl-convert-python, `pip install -e ".[plots]"`), and ``.dvc/config`` points
``plots.html_template`` at it. Rerun it only to upgrade the bundled Vega.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.files import write_text

ROOT = Path(__file__).resolve().parents[1]
VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite v5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
  {refresh_tag}
  <meta charset="utf-8">
  <title>DVC plots (offline)</title>
  <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed}: inlined so the page needs no network -->
  <script type="text/javascript">
BUNDLE
  </script>
  <style>
    body { font-family: sans-serif; }
    table { border-spacing: 15px; }
  </style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".dvc" / "plots" / "offline.html"), help="(default: %(default)s)")
    args = p.parse_args()
    import vl_convert as vlc

    bundle = vlc.javascript_bundle(vl_version=VEGA_LITE)
    # DVC fills {refresh_tag} and {plot_divs} by plain replacement; {scripts} (the CDN tags) is left out on purpose.
    page = (
        PAGE.replace("{vega}", vlc.get_vega_version())
        .replace("{vega_lite}", VEGA_LITE)
        .replace("{vega_embed}", vlc.get_vega_embed_version())
        .replace("BUNDLE", bundle.replace("</script", "<\\/script"))
    )
    out = Path(args.out)
    write_text(out, page)
    print(f"wrote {out} ({len(page) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
