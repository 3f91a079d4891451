"""MkDocs hooks: benchmark results in the site, and Sphinx roles in docstrings.

* Pages link benchmark files relative to their own place in the repository
  (``../benchmarks/results/compare.md`` from ``docs/comparison.md``), which is
  what GitHub shows. MkDocs only knows files under ``docs/``, so the hook adds
  the benchmark results to the site under ``benchmarks/results/`` and
  rewrites such links to point there.
* Docstrings cross-reference with Sphinx roles (``:class:`skuq.base.X```),
  which mkdocstrings shows verbatim. The hook turns each into an optional
  autorefs link: a link where the name is documented on the site, plain code
  (and no warning) where it is not.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
MOUNTED = "benchmarks/results/"
SUFFIXES = {".md", ".png", ".csv", ".json"}
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):<code>(~?)([\w.]+)(\(\))?</code>")


def on_files(files, config):
    for path in sorted((ROOT / MOUNTED).glob("*")):
        if path.suffix in SUFFIXES and path.is_file():
            files.append(File(
                f"{MOUNTED}{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            ))
    return files


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        url = match.group(2)
        if "://" in url or url.startswith("#"):
            return match.group(0)
        target, _, anchor = url.partition("#")
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not in_repo.startswith(MOUNTED):
            return match.group(0)
        new = posixpath.relpath(in_repo, page_dir or ".")
        return match.group(1) + new + (f"#{anchor}" if anchor else "") + match.group(3)

    return _LINK.sub(rewrite, markdown)


_NAMES: dict[str, set[str]] = {}


def _index() -> dict[str, set[str]]:
    """Short names (``Moments``, ``OutputDistribution.sample``) -> full skuq paths."""
    if not _NAMES:
        import griffe

        def walk(obj, owner=None):
            for member in obj.members.values():
                if member.is_alias or member.name.startswith("_"):
                    continue
                _NAMES.setdefault(member.name, set()).add(member.path)
                if owner is not None:
                    _NAMES.setdefault(f"{owner}.{member.name}", set()).add(member.path)
                if member.is_module:
                    walk(member)
                elif member.is_class:
                    walk(member, owner=member.name)

        walk(griffe.load("skuq", search_paths=[str(ROOT)]))
    return _NAMES


def _resolve(name: str) -> str:
    """A full path for a name written relative to its module, when it is unambiguous."""
    if name.startswith(("skuq.", "sklearn.", "torch.")):
        return name
    found = _index().get(name, set())
    return next(iter(found)) if len(found) == 1 else name


def on_page_content(html, page, config, files):
    def link(match):
        tilde, name, call = match.group(1), match.group(2), match.group(3) or ""
        shown = name.rsplit(".", 1)[-1] if tilde else name
        target = _resolve(name)
        return f'<autoref identifier="{target}" optional><code>{shown}{call}</code></autoref>'

    return _ROLE.sub(link, html)
