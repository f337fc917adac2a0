"""The book builds strictly and its pages render in a real browser.

* The strict build: ``jupyter-book build . -W --keep-going`` into a temporary folder must succeed
  with no warning (``-W`` makes any warning fail the build).
* Headless Chromium opens the introduction, the priors chapter and the library reference: every
  formula is typeset by the offline MathJax, every image loads, the console has no errors. The
  screenshots are kept in a temporary folder (``BCLIB_SCREENSHOTS=DIR`` keeps them in DIR).
* The library reference documents every public name of ``bclib``.

The notebooks themselves are executed by nbval in the test command (``pytest --nbval-lax``),
not here.
"""
from __future__ import annotations

import html.parser
import importlib.util
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("book/intro.html", "book/02_priors.html", "book/api.html")


def _load_browser_check():
    spec = importlib.util.spec_from_file_location("browser_check", ROOT / ".ci" / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


browser_check = _load_browser_check()


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """Build the book once into a temporary folder; returns (html folder, build log)."""
    output = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"the strict book build failed:\n{log[-6000:]}"
    return output / "_build" / "html", log


@pytest.fixture(scope="module")
def rendered(built_book, tmp_path_factory):
    """The browser's report of each checked page, with a screenshot of each."""
    html_root, _ = built_book
    folder = Path(os.environ.get("BCLIB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    return {report["page"]: report for report in browser_check.check_pages(html_root, PAGES, folder)}


# ----------------------------------------------------------------------------- the build
def test_build_has_no_warnings(built_book):
    _, log = built_book
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert warnings == []
    assert "build succeeded" in log


def test_every_page_of_the_toc_is_built(built_book):
    html_root, _ = built_book
    for page in ("book/intro.html", "book/01_mdl.html", "book/02_priors.html", "book/api.html",
                 "book/references.html"):
        assert (html_root / page).stat().st_size > 0, page


def test_math_is_served_offline(built_book):
    # sphinx-mathjax-offline copies MathJax into _static; a CDN URL would not render offline.
    html_root, _ = built_book
    page = (html_root / "book" / "02_priors.html").read_text(encoding="utf-8")
    assert "mathjax" in page.lower()
    assert "cdn.jsdelivr.net/npm/mathjax" not in page
    assert any((html_root / "_static").rglob("tex-chtml*.js"))


def test_the_reference_documents_the_public_api(built_book):
    import bclib

    html_root, _ = built_book
    page = (html_root / "book" / "api.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page))
    aliases = {"LinearGroupVD", "Conv2dGroupVD"}  # the release's names, mentioned beside the NJ layers
    for name in sorted(set(bclib.__all__) - aliases):
        assert any(a == f"bclib.{name}" or (a.startswith("bclib.") and a.endswith(f".{name}")) for a in anchors), name
    # The layers' methods, the interface every chapter calls.
    for method in ("kl_divergence", "log_alpha", "posterior_weight", "clip_variances", "reset_parameters"):
        assert f"bclib.Conv2dGroupHS.{method}" in anchors, method
    assert {"bclib.layer_sequence.layer_sequence", "bclib.compression.prune_further", "bclib.train.fit"} <= anchors
    assert "bclib.LinearGroupNJ.apply" not in anchors  # nn.Module's own methods are left to PyTorch's docs


class _ImageSources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


@pytest.mark.parametrize("page", PAGES)
def test_every_image_file_exists(built_book, page):
    html_root, _ = built_book
    parser = _ImageSources()
    parser.feed((html_root / page).read_text(encoding="utf-8"))
    for source in parser.sources:
        assert not source.startswith(("http:", "https:", "//")), f"{page} loads {source} from the network"
        path = (html_root / page).parent / source.split("?")[0]
        assert path.is_file() and path.stat().st_size > 0, f"{page}: missing image {source}"


def test_the_chapter_has_its_figures(built_book):
    html_root, _ = built_book
    parser = _ImageSources()
    parser.feed((html_root / "book" / "02_priors.html").read_text(encoding="utf-8"))
    assert len(parser.sources) >= 5


def test_no_prose_line_is_lost_as_a_myst_comment():
    """MyST drops a line that starts with ``%`` (a comment): a paragraph reflowed so that
    "0.85 %" breaks before its sign loses the rest of that line from the page."""
    import json

    sources = {path: path.read_text(encoding="utf-8") for path in (ROOT / "book").glob("*.md")}
    for path in (ROOT / "book").glob("*.ipynb"):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        sources[path] = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    lost = [(path.name, line) for path, text in sources.items() for line in text.splitlines()
            if line.lstrip().startswith("%")]
    assert len(sources) >= 10 and not lost, lost


# ----------------------------------------------------------------------------- in the browser
@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset(rendered, page):
    report = rendered[page]
    assert report["mathjax_loaded"]
    assert report["mjx_containers"] > 0
    # Every formula of the page was typeset (none left as raw TeX).
    assert report["mjx_containers"] == report["math_source_nodes"]


@pytest.mark.parametrize("page", PAGES)
def test_no_broken_images(rendered, page):
    report = rendered[page]
    assert report["broken_images"] == []
    assert all(image["width"] > 0 and image["height"] > 0 for image in report["images"])


@pytest.mark.parametrize("page", PAGES)
def test_no_console_errors(rendered, page):
    assert rendered[page]["console_errors"] == []


@pytest.mark.parametrize("page", PAGES)
def test_screenshot_is_a_png_of_the_window(rendered, page):
    data = Path(rendered[page]["screenshot"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1280, 900)


def test_the_browser_check_detects_failures(tmp_path):
    # A page with a broken image, a console error and an uncaught exception must be reported.
    (tmp_path / "bad.html").write_text(
        "<html><body><p>x</p><img src='missing.png'>"
        "<script>console.error('deliberate console error')</script>"
        "<script>throw new Error('deliberate exception')</script></body></html>"
    )
    (report,) = browser_check.check_pages(tmp_path, ["bad.html"])
    assert report["broken_images"] == ["missing.png"]
    errors = " ".join(report["console_errors"])
    assert "deliberate console error" in errors
    assert "deliberate exception" in errors
    assert report["mjx_containers"] == 0
