"""The documentation site as people see it.

The site is built once per session (``built_site`` in ``tests/conftest.py``). Two kinds of checks:

* **The built HTML** (no browser): every notebook page carries its outputs and figures, the API
  reference shows no private member and documents every public name, every notebook is in the
  navigation, and no page loads anything from another host.
* **A real browser** (the system's headless Chromium, network blocked; ``tests/site_tools.py``):
  every page is loaded from a loopback server at a desktop and a narrow width and must show its
  formulas typeset by the site's own MathJax (no raw ``$…$``, ``\\(…\\)``, ``\\[…\\]`` or ``$$…$$`` left
  in the text, no TeX error), load every image, request nothing off the loopback, raise no script
  error, and cut nothing: an element wider than its column must sit in a box that scrolls.
"""

from __future__ import annotations

import html
import html.parser
import json
import pathlib
import re

import pytest

from site_tools import ROOT, Chromium, SiteServer, chromium_path, require

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCS = ROOT / "docs"


def _md_pages() -> list[str]:
    out = []
    for p in sorted(DOCS.rglob("*.md")):
        rel = p.relative_to(DOCS)
        if rel.parts[0] == "notebooks":
            continue
        out.append("" if rel.as_posix() == "index.md" else rel.with_suffix("").as_posix() + "/")
    return out


#: Every page of the site, as URL paths relative to the site root.
PAGES = _md_pages() + [f"notebooks/{p.stem}/" for p in NOTEBOOKS]


def _site(built_site) -> pathlib.Path:
    site, proc = built_site
    if proc.returncode != 0:
        pytest.fail("the site did not build (see test_docs.py::test_mkdocs_build_strict)", pytrace=False)
    return site


def _page_html(site: pathlib.Path, url: str) -> str:
    return (site / url / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- navigation
def _nav_files(nav) -> list[str]:
    out: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out += _nav_files(value)
        else:
            out.append(value)
    return out


def _mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags: read them as None
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_page_and_notebook_is_in_the_navigation() -> None:
    """A notebook or page added without its ``nav`` line in mkdocs.yml would be unreachable."""
    nav = set(_nav_files(_mkdocs_config()["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "notebooks" not in p.parts}
    on_disk |= {f"notebooks/{p.name}" for p in NOTEBOOKS}
    assert on_disk <= nav, f"not in mkdocs.yml's nav: {sorted(on_disk - nav)}"
    assert nav <= on_disk, f"nav entries without a file: {sorted(nav - on_disk)}"


# --------------------------------------------------------------------------- notebooks (HTML)
def _cell_segments(page: str) -> dict[str, str]:
    """HTML of each notebook cell, keyed by cell id (nbconvert writes ``id="cell-id=<id>"``)."""
    parts = re.split(r'id="cell-id=([0-9a-f]+)"', page)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


_PRINTS = re.compile(r"^\s*print\(|^\s*display\(", re.M)
_PLOTS = re.compile(r"\bplt\.show\(\)")


class _Outputs(html.parser.HTMLParser):
    """The rendered outputs of a cell: for each ``jp-OutputArea-output`` element, its text and
    its images."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[dict] = []
        self._depth = 0  # element depth inside the current output (0: outside)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if self._depth:
            if tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,"):
                self.outputs[-1]["images"] += 1
            if tag not in _VOID:
                self._depth += 1
        elif tag == "div" and "jp-OutputArea-output" in (a.get("class") or "").split():
            self.outputs.append({"text": "", "images": 0, "class": a.get("class")})
            self._depth = 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth and tag not in _VOID:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.outputs[-1]["text"] += data


_VOID = {"img", "br", "hr", "input", "meta", "link", "source", "wbr", "area", "base", "col", "embed", "param", "track"}


def _outputs(segment: str) -> list[dict]:
    parser = _Outputs()
    parser.feed(segment)
    return parser.outputs


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_page_shows_outputs_and_figures(built_site, nb_path: pathlib.Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    site = _site(built_site)
    nb = nbformat.read(nb_path, as_version=4)
    segments = _cell_segments(_page_html(site, f"notebooks/{nb_path.stem}"))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.id in segments for c in nb.cells), f"{nb_path.name}: cells missing from the page"
    n_figures = 0
    for cell in code:
        seg = segments[cell.id]
        outputs = _outputs(seg)
        images = sum(o["images"] for o in outputs)
        first_line = cell.source.strip().splitlines()[0][:80]
        if _PRINTS.search(cell.source) or _PLOTS.search(cell.source):
            assert outputs and all(o["text"].strip() or o["images"] for o in outputs), (
                f"{nb_path.name}: cell `{first_line}` prints or plots but its output is empty"
            )
        if _PLOTS.search(cell.source):
            assert images >= len(_PLOTS.findall(cell.source)), f"{nb_path.name}: cell `{first_line}` plots but shows no figure"
        assert not any("stderr" in (o["class"] or "") for o in outputs) and "ansi-red" not in seg, (
            f"{nb_path.name}: cell `{first_line}` shows an error or a warning"
        )
        n_figures += images
    n_plots = sum(len(_PLOTS.findall(c.source)) for c in code)
    assert n_figures == n_plots, f"{nb_path.name}: {n_figures} figures on the page for {n_plots} plt.show() calls"


# --------------------------------------------------------------------------- reference pages
def test_reference_pages_hide_private_members(built_site) -> None:
    site = _site(built_site)
    bad = []
    for page in sorted((site / "api").glob("*/index.html")) + sorted((site / "spaces").glob("*/index.html")) + [site / "guide/nn/index.html"]:
        for anchor in re.findall(r'id="(geofunc[\w.]*)"', page.read_text()):
            if any(part.startswith("_") for part in anchor.split(".")):
                bad.append(f"{page.relative_to(site).parent}: {anchor}")
    assert not bad, "private or dunder members on the reference pages:\n  " + "\n  ".join(bad)


def test_every_public_name_is_on_the_site(built_site) -> None:
    import geofunc as gf
    import geofunc.nn
    import geofunc.optim
    import geofunc.testing

    site = _site(built_site)
    anchors = set()
    for page in site.rglob("index.html"):
        anchors |= set(re.findall(r'id="(geofunc[\w.]*)"', page.read_text()))
    modules = [gf, gf.nn, gf.optim, gf.testing]
    try:
        import geofunc.contrib.zuko

        modules.append(geofunc.contrib.zuko)
    except ImportError:  # zuko is not installed: its page is still built, from the source
        pass
    missing = []
    for mod in modules:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type(gf)) or not callable(obj):
                continue  # submodules have their own pages; constants are documented by their module
            if not getattr(obj, "__module__", "geofunc").startswith("geofunc"):
                # a PyTorch object re-exported as is (gf.nn.cached): the reference cannot render
                # it, so the page of its module must name it.
                page = _page_html(site, "api/" + mod.__name__.split(".")[1]) if mod is not gf else ""
                if f"{name}" not in re.sub(r"<[^>]+>", "", page):
                    missing.append(f"{mod.__name__}.{name} (re-exported from {obj.__module__}, not mentioned)")
                continue
            if f"{mod.__name__}.{name}" not in anchors:
                missing.append(f"{mod.__name__}.{name}")
    assert not missing, "public names without a reference entry on the site:\n  " + "\n  ".join(missing)


def test_no_page_loads_anything_from_another_host(built_site) -> None:
    """Scripts, styles, fonts and images all come from the site (the browser test proves the
    pages render without network; this names the offending tag)."""
    site = _site(built_site)
    external = r'="((?:https?:)?//[^"]+)"'
    bad = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        for tag in re.findall(r"<(?:script|img|iframe|source|embed|video|audio)\b[^>]*>", text):
            bad += [f"{page.relative_to(site)}: {u}" for u in re.findall(r"\bsrc" + external, tag)]
        for tag in re.findall(r"<link\b[^>]*>", text):
            if re.search(r'rel="(?:stylesheet|preload|modulepreload|icon|shortcut icon)"', tag):
                bad += [f"{page.relative_to(site)}: {u}" for u in re.findall(r"\bhref" + external, tag)]
        for url in re.findall(r"""(?:\bimport\(|@import\s+url\()\s*["']((?:https?:)?//[^"']+)""", text):
            bad.append(f"{page.relative_to(site)}: {url}")
    assert not bad, "pages that load from another host:\n  " + "\n  ".join(sorted(set(bad))[:30])


def test_mathjax_is_served_by_the_site(built_site) -> None:
    site = _site(built_site)
    entry = site / "assets" / "mathjax" / "tex-chtml-full.js"
    fonts = list((site / "assets" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert entry.is_file() and entry.stat().st_size > 500_000, "MathJax is not copied into the site"
    assert len(fonts) >= 20, f"MathJax's fonts are missing ({len(fonts)} found)"
    index = (site / "index.html").read_text()
    assert 'src="assets/mathjax/tex-chtml-full.js"' in index


# --------------------------------------------------------------------------- in a browser
#: Run in each page once MathJax is done: what a reader would see.
CHECK_JS = r"""
(async () => {
  const mj = window.MathJax;
  const loaded = !!(mj && mj.startup && mj.startup.promise && mj.typesetPromise);
  if (loaded) { await mj.startup.promise; }
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));  // layout settled
  await Promise.all([...document.images].map(img => img.complete ? 0 : new Promise(r => { img.onload = img.onerror = r; })));
  const SKIP = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "NOSCRIPT", "MJX-CONTAINER", "KBD"]);
  const hidden = el => { for (let e = el; e; e = e.parentElement) { if (SKIP.has(e.tagName)) return true; } return false; };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let text = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) { if (!hidden(n.parentElement)) text.push(n.nodeValue); }
  const root = document.querySelector("article.md-content__inner") || document.body;
  // The visible column: the article plus its margins (the theme lets code blocks, tables and
  // display maths reach into those on purpose), between the two sidebars.
  const rr = (root.closest(".md-content") || root).getBoundingClientRect();
  const describe = el => {
    const cls = (el.getAttribute("class") || "").split(/\s+/).slice(0, 3).join(".");
    const txt = (el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60);
    return `<${el.tagName.toLowerCase()}${cls ? "." + cls : ""}> "${txt}"`;
  };
  const overflow = [];
  const TOL = 4;  // px: an inline box's padding or a glyph's overhang at a line end is not a cut
  for (const el of root.querySelectorAll("*")) {
    if (el.tagName !== "MJX-CONTAINER" && el.closest("mjx-container")) continue;  // MathJax's own layout
    const cs = getComputedStyle(el);
    if (cs.display === "none" || cs.visibility === "hidden" || cs.position === "fixed") continue;
    let r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if (cs.display === "inline") {  // an inline box's padding may pass the edge: measure its text
      const range = document.createRange();
      range.selectNodeContents(el);
      r = range.getBoundingClientRect();
      if (r.width === 0) continue;
    }
    const ox = cs.overflowX;
    if ((ox === "hidden" || ox === "clip") && el.scrollWidth > el.clientWidth + TOL) {
      overflow.push(describe(el) + ` cuts its content (${el.scrollWidth} px in ${el.clientWidth} px)`);
      continue;
    }
    if (ox === "visible" && cs.display !== "inline") {  // content spilling out of the box counts too
      r = {left: r.left, right: Math.max(r.right, r.left + el.scrollWidth)};
    }
    let box = null;
    for (let a = el.parentElement; a && a !== root; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== "visible") { box = a; break; }
    }
    if (box && ["auto", "scroll"].includes(getComputedStyle(box).overflowX)) continue;  // reachable by scrolling
    const limit = box ? box.getBoundingClientRect() : rr;
    if (r.left < limit.left - TOL || r.right > limit.right + TOL) {
      overflow.push(describe(el) + (box ? ` cut by ${describe(box)}` : " sticks out of the column"));
    }
  }
  return {
    loaded,
    containers: document.querySelectorAll("mjx-container").length,
    errors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 80)),
    text: text.join(" "),
    overflow: overflow.slice(0, 12),
    pageScroll: document.documentElement.scrollWidth - window.innerWidth,
    brokenImages: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80)),
    images: document.querySelectorAll("article img").length,
  };
})()
"""

#: Raw TeX a reader must never see (outside code): delimiters, or a TeX command.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^\s$][^$]{0,200}?\$|\\[A-Za-z]{2,}")
WIDTHS = (1280, 600)


def _expected_formulas(site: pathlib.Path, url: str) -> int:
    """Formulas the page source holds: arithmatex elements (Markdown pages and docstrings) plus
    the ``$…$``/``$$…$$`` spans of a notebook's Markdown cells."""
    page = _page_html(site, url)
    count = len(re.findall(r'class="arithmatex"', page))
    if url.startswith("notebooks/"):
        nbformat = pytest.importorskip("nbformat")
        nb = nbformat.read(ROOT / "notebooks" / (url.split("/")[1] + ".ipynb"), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                src = re.sub(r"`[^`]*`", "", cell.source)
                src, n_display = re.subn(r"\$\$.+?\$\$", "", src, flags=re.S)
                count += n_display + len(re.findall(r"\$[^$\n]+\$", src))
    return count


@pytest.fixture(scope="module")
def browser(built_site):
    exe = chromium_path()
    require(exe is not None, "Chromium is not installed (apt-get install -y chromium)")
    site = _site(built_site)
    with SiteServer(site) as server, Chromium(exe) as chrome:
        yield site, server, chrome


@pytest.mark.parametrize("url", PAGES)
def test_page_in_a_browser(browser, url: str) -> None:
    site, server, chrome = browser
    expected = _expected_formulas(site, url)
    problems: list[str] = []
    chrome.open(f"{server.origin}/{url}", width=WIDTHS[0])
    for width in WIDTHS:
        if width != WIDTHS[0]:
            chrome.resize(width)  # the same page, laid out for a narrow screen
        r = chrome.evaluate(CHECK_JS)
        at = f"[{width}px]"
        if not r["loaded"]:
            problems.append(f"{at} MathJax did not load")
        if r["containers"] < expected:
            problems.append(f"{at} {r['containers']} typeset formulas, the source has {expected}")
        problems += [f"{at} TeX error: {e}" for e in r["errors"]]
        raw = sorted({m.group() for m in RAW_TEX.finditer(r["text"])})
        if raw:
            problems.append(f"{at} raw TeX in the text: {raw[:8]}")
        problems += [f"{at} cut: {o}" for o in r["overflow"]]
        if r["pageScroll"] > 1:
            problems.append(f"{at} the page scrolls sideways by {r['pageScroll']} px")
        problems += [f"{at} image did not load: {s}" for s in r["brokenImages"]]
    for ev in chrome.page_events("Network.requestWillBeSent"):
        u = ev["request"]["url"]
        if not (u.startswith(server.origin + "/") or u.startswith("data:") or u.startswith("blob:")):
            problems.append(f"request off the site: {u[:100]}")
    problems += [f"failed to load: {ev.get('errorText')} ({ev.get('type')})" for ev in chrome.page_events("Network.loadingFailed")]
    for ev in chrome.page_events("Network.responseReceived"):
        if ev["response"]["status"] >= 400:
            problems.append(f"HTTP {ev['response']['status']}: {ev['response']['url'][:100]}")
    problems += [f"script error: {json.dumps(ev['exceptionDetails'])[:300]}" for ev in chrome.page_events("Runtime.exceptionThrown")]
    problems += [f"console: {ev['entry']['text'][:200]}" for ev in chrome.page_events("Log.entryAdded") if ev["entry"]["level"] == "error"]
    if url.startswith("notebooks/"):
        nbformat = pytest.importorskip("nbformat")
        nb = nbformat.read(ROOT / "notebooks" / (url.split("/")[1] + ".ipynb"), as_version=4)
        n_plots = sum(len(_PLOTS.findall(c.source)) for c in nb.cells if c.cell_type == "code")
        if r["images"] < n_plots:
            problems.append(f"{r['images']} images shown for {n_plots} figures")
    assert not problems, f"/{url}:\n  " + "\n  ".join(problems)


def test_install_commands_pin_torch_as_ci_does() -> None:
    """Every ``pip install -e`` in the README, CONTRIBUTING and the docs pages first installs the
    pinned CPU torch that .ci/run installs (the docs home page once installed with no pin)."""
    pin = re.search(r"pip install (torch==[\w.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    bad = []
    for page in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if "pip install -e" in line and f"pip install {pin} &&" not in line.split("pip install -e")[0]:
                    bad.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert not bad, f"installs without `pip install {pin} &&` first:\n  " + "\n  ".join(bad)
