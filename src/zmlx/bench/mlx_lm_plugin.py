"""A pytest plugin: every model of a family zmlx knows is patched right after it is built.

    pytest -p zmlx.bench.mlx_lm_plugin --zmlx-patterns=default --zmlx-record=out.jsonl ...

Wraps `Model.__init__` of each mlx-lm module a zmlx family names (zmlx.families), so that a
test that builds a model gets it patched (`zmlx.patch(model, patterns=...)`; "default": the
family's preset) before it runs anything. Each patch appends one JSON line to the record:
the model type, the patterns applied and the modules patched, so a run can show it patched
something. Used by zmlx.bench.mlx_lm_tests to run mlx-lm's own model tests patched.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings


def pytest_addoption(parser) -> None:
    group = parser.getgroup("zmlx")
    group.addoption("--zmlx-patterns", default="default", help="selection to patch with ('default': preset)")
    group.addoption("--zmlx-record", default=None, help="file to append one JSON line per patch to")


def model_modules() -> list[str]:
    """The mlx-lm modules whose `Model` a zmlx family patches."""
    from zmlx.families import FAMILIES

    names = set()
    for fam in FAMILIES.values():
        names.add(fam.module)
        names.update(t.module for t in fam.targets.values() if t.module)
    return sorted(names)


def install(patterns: str | None, record: str | None) -> list[str]:
    """Wrap each family module's Model.__init__ (once); returns the modules wrapped."""
    import zmlx

    def wrap(init):
        @functools.wraps(init)
        def patched_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "nothing applies" on a model of another family
                result = zmlx.patch(self, patterns=patterns)
            if record:
                applied = sorted(n for n, r in result.patterns.items() if r.patched)
                line = {"model_type": result.family, "applied": applied, "modules": result.patched_modules}
                with open(record, "a") as f:
                    f.write(json.dumps(line) + "\n")

        patched_init.__zmlx_wrapped__ = True  # type: ignore[attr-defined]
        return patched_init

    wrapped = []
    for name in model_modules():
        model = getattr(importlib.import_module(name), "Model", None)
        if model is None or getattr(model.__init__, "__zmlx_wrapped__", False):
            continue
        model.__init__ = wrap(model.__init__)
        wrapped.append(name)
    return wrapped


def pytest_configure(config) -> None:
    selection = config.getoption("--zmlx-patterns")
    install(None if selection == "default" else selection, config.getoption("--zmlx-record"))
