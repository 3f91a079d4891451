"""The docs keep up with the code: every estimator and example has its place on the site.

These checks read files only (no MkDocs needed); ``bash docs/build.sh`` is the
strict build itself.
"""

import re
from pathlib import Path

import pytest

from skuq.base import all_estimators

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
NAV = (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize("name", [name for name, _ in all_estimators()])
def test_every_estimator_has_a_method_page_and_an_api_entry(name):
    pages = [p for p in (DOCS / "methods").glob("*.md") if f"`{name}`" in p.read_text()]
    assert pages, f"no page in docs/methods/ names `{name}`"
    assert f"::: skuq.{name}\n" in (DOCS / "api" / "estimators.md").read_text()


def test_every_method_page_is_in_the_nav_and_has_the_same_sections():
    for page in sorted((DOCS / "methods").glob("*.md")):
        assert f"methods/{page.name}" in NAV, page.name
        if page.name in ("index.md", "map.md"):
            continue  # the overview; MAP and temperature scaling share a page
        headings = re.findall(r"^## (.+)$", page.read_text(), flags=re.M)
        for section in (
            "The idea",
            "The math",
            "Parameters",
            "When to use it",
            "Cost",
            "Benchmark numbers",
            "API",
        ):
            assert section in headings, (page.name, section)


def test_every_example_is_in_the_gallery_with_its_figure_and_a_test():
    gallery = (DOCS / "gallery.md").read_text()
    tests = (ROOT / "tests" / "examples" / "test_examples.py").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        name = script.stem
        assert f'--8<-- "examples/{name}.py"' in gallery, name
        assert f"(gallery/{name}.png)" in gallery, name
        assert (DOCS / "gallery" / f"{name}.png").is_file(), name
        assert f'_load("{name}")' in tests, name
        source = script.read_text()
        assert "--quick" in source and "--out" in source and "def main(" in source, name


def test_linked_benchmark_results_exist():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(((?:\.\./)+benchmarks/results/[^)#\s]+)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), (page.name, target)


def test_every_public_name_has_a_runnable_example():
    import importlib
    import inspect
    import pkgutil

    import skuq

    missing = set()
    modules = [skuq] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(skuq.__path__, prefix="skuq.")
    ]
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if ">>>" not in doc:
                missing.add(f"{obj.__module__}.{obj.__qualname__}")
    assert not missing, "no doctest example in: " + ", ".join(sorted(missing))


@pytest.mark.slow
def test_readme_usage_runs_and_prints_a_readable_result(capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python block"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    numbers = dict(re.findall(r"(accuracy|ECE|OOD AUROC) ([0-9.]+)", line))
    assert set(numbers) == {"accuracy", "ECE", "OOD AUROC"}, line
    assert float(numbers["accuracy"]) > 0.9 and float(numbers["OOD AUROC"]) > 0.7, line
