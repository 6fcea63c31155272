"""patch / unpatch: swap methods of a model's module instances, and put them back.

Python looks special methods such as `__call__` up on the type, not the instance,
so a patched instance gets its own class: a subclass of its mlx-lm class that
defines only the replaced methods (cached per class and replacement set). mlx-lm's
classes are never modified, so another model in the process is unaffected, and
`isinstance` checks in mlx-lm keep working. `unpatch` assigns each instance its
original class back: the same module objects, the same class objects, nothing
added to them. A patched instance pickles as its mlx-lm class plus the patterns that
replaced its methods, and loads patched the same way (the model's state with it, so
`unpatch` works on the copy).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import Any, Iterable, Literal, Sequence

from zmlx import backend as _backend
from zmlx import distributed as _distributed
from zmlx.backend import Backend
from zmlx.config import (
    NOT_FLAGS,
    ConfigError,
    PatchConfig,
    Preset,
    check_preset,
    flag_name,
    kernel_sources_dir,
    parse_selection,
)
from zmlx.families import FAMILIES, UNSUPPORTED, Family, family_of
from zmlx.kernels import ptx_cache
from zmlx.patch.layer import forget
from zmlx.patch.patterns import PATTERNS
from zmlx.patch.result import PatchResult, PatternReport

__all__ = ["PatchResult", "PatternReport", "ZmlxWarning", "patch", "select_patterns", "unpatch"]

_STATE = "_zmlx_state"
RESULT_ATTR = "zmlx_patch_result"


class ZmlxWarning(UserWarning):
    """zmlx could not do what was asked, but the model still works as before."""


# ---------------------------------------------------------------- selection


def check_names(names: Iterable[str], what: str) -> None:
    unknown = [n for n in names if n not in PATTERNS]
    if unknown:
        raise ConfigError(
            f"unknown pattern(s) in {what}: {', '.join(unknown)}; valid: {', '.join(sorted(PATTERNS))}"
        )


def parse_names(value: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    """`parse_selection`'s grammar (see zmlx.config), names checked against the registry."""
    names = parse_selection(value, what)
    check_names(names or (), what)
    return names


_WARNED: set[str] = set()  # unknown ZMLX_* names already warned about in this process


def warn_unknown_variables(config: PatchConfig) -> None:
    """A ZmlxWarning, once per process per name, for each ZMLX_* variable that is neither a
    pattern's flag nor one of config.py's variables (a typo is otherwise silently ignored)."""
    flags = sorted(flag_name(n) for n in PATTERNS)
    for name in sorted(set(config.flags) - set(flags) - _WARNED):
        _WARNED.add(name)
        near = difflib.get_close_matches(name, flags + list(NOT_FLAGS), n=1)
        warnings.warn(
            f"{name} is not a zmlx variable and is ignored"
            + (f" (did you mean {near[0]}?)" if near else "")
            + f"; pattern flags: {', '.join(flags)}; other variables: {', '.join(sorted(NOT_FLAGS))}",
            ZmlxWarning,
            stacklevel=3,
        )


def resolve_preset(preset: str | None, config: PatchConfig) -> Preset:
    """The preset in force: the argument, else ZMLX_PRESET, else "default"."""
    return check_preset(preset, "preset") or config.preset or "default"


def preset_note(fam: Family | None, preset: str, backend: Backend) -> str:
    """What the preset adds to the default one on `backend`, or why it adds nothing."""
    if preset != "fast" or fam is None:
        return ""
    added = fam.fast_added(backend)
    if not added:
        return f"no close pattern is ACCURATE on {backend} in the ledger yet: the same as default"
    return f"adds {', '.join(added)} (close, ACCURATE on {backend} in the ledger)"


def select_patterns(
    family: str | None,
    patterns: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    config: PatchConfig,
    backend: Backend = "cpu",
    preset: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The patterns to apply on `backend`, in registry order, and why each other known one
    is not. `patterns` and `exclude` follow `zmlx.config.parse_selection`; explicit patterns
    win over the preset (`resolve_preset`: the argument, else ZMLX_PRESET, else default)."""
    patterns, exclude = parse_selection(patterns, "patterns"), parse_selection(exclude, "exclude")
    for names, what in (
        (patterns, "patterns"),
        (exclude, "exclude"),
        (config.patterns, "ZMLX_PATTERNS"),
        (config.exclude, "ZMLX_EXCLUDE"),
    ):
        check_names(names or (), what)
    fam = FAMILIES.get(family) if family is not None else None
    name_of_preset = resolve_preset(preset, config)
    in_preset = fam.preset_named(name_of_preset, backend) if fam else ()
    explicit = patterns if patterns is not None else config.patterns
    why_not: dict[str, str] = {}
    if explicit is not None:
        chosen = set(explicit)
        why = "not in the requested patterns"
    else:
        chosen = set()
        for name in PATTERNS:
            flag = config.flag(name)
            if flag is True or (flag is None and name in in_preset):
                chosen.add(name)
            elif flag is False and name in in_preset:
                why_not[name] = f"{flag_name(name)}=0"
        varies = fam and (fam.presets_on or (name_of_preset == "fast" and fam.fast_on))
        why = f"not in the {name_of_preset} preset" + (f" on {backend}" if varies else "")
    for name in (*(exclude or ()), *config.exclude):
        if name in chosen:
            chosen.discard(name)
            why_not[name] = "excluded"
    selected = [n for n in PATTERNS if n in chosen]
    for name in PATTERNS:
        if name not in chosen and name not in why_not and fam and name in fam.targets:
            why_not[name] = why
    return selected, why_not


# ---------------------------------------------------------------- class swap


# replacement function -> (pattern name, make()'s keyword arguments as sorted items): what
# rebuilds it in another process, where the function itself cannot be pickled
_MADE: dict[Any, tuple[str, tuple[tuple[str, Any], ...]]] = {}


def _replacement(name: str, kwargs: dict[str, Any]):
    """The pattern's function for these arguments (make() is cached: the same object for
    the same arguments), remembered with how to make it again."""
    fn = PATTERNS[name].make(**kwargs)
    _MADE[fn] = (name, tuple(sorted(kwargs.items())))
    return fn


# `cls` and `patched` are Any: mypy reads `cls.__new__` as the metaclass's (type.__new__)
def _rebuild(cls: Any, spec: tuple[tuple[str, str, tuple], ...]):
    """An empty instance of `cls` patched as `spec` says ((method, pattern, make() kwargs),
    ...); pickle fills in its state. A pattern this zmlx cannot make gives the stock class
    and a warning: the module then computes what stock computes."""
    try:
        methods = tuple((method, _replacement(name, dict(kwargs))) for method, name, kwargs in spec)
    except (KeyError, TypeError) as e:
        warnings.warn(
            f"a pickled zmlx patch of {cls.__name__} cannot be restored ({e!r}); "
            "it loads as the stock module",
            ZmlxWarning,
            stacklevel=2,
        )
        return cls.__new__(cls)
    patched: Any = _patched_class(cls, methods)
    return patched.__new__(patched)


def _reduce_ex(self, protocol):
    """Pickle a patched instance as its mlx-lm class plus the patterns that replaced its
    methods (the generated class has no importable name); loading patches it again."""
    cls = type(self)
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))  # (__newobj__, (cls,), state, ...)
    spec = tuple((method, *_MADE[fn]) for method, fn in cls.__zmlx_methods__)
    return (_rebuild, (cls.__zmlx_original__, spec), *rest)


@functools.cache
def _patched_class(cls: type, methods: tuple[tuple[str, Any], ...]) -> type:
    ns = dict(methods)
    ns["__zmlx_original__"] = cls
    ns["__zmlx_methods__"] = methods
    ns["__reduce_ex__"] = _reduce_ex
    ns["__module__"] = __name__
    ns["__qualname__"] = cls.__qualname__
    return type(cls.__name__, (cls,), ns)


def _merge(methods: dict[str, Any], first: str, pattern, kwargs: dict[str, Any]) -> str | None:
    """Add `pattern`'s part to the method that pattern `first` already replaced on this
    instance: the one function made from both patterns' make() arguments (Pattern.part), so
    each keeps its own flag, report and fidelity; or why `pattern` is skipped there."""
    if not (pattern.part and PATTERNS[first].part):
        return f"{pattern.method} already replaced by {first}"
    made_by, made_with = _MADE[methods[pattern.method]]
    methods[pattern.method] = _replacement(made_by, {**dict(made_with), **kwargs})
    return None


def _signature_mismatch(cls: type, method: str, fn) -> str | None:
    original = getattr(cls, method, None)
    if original is None:
        return f"{cls.__name__} has no {method}"
    a = list(inspect.signature(original).parameters)
    b = list(inspect.signature(fn).parameters)
    if a != b:
        return f"{cls.__name__}.{method} signature changed: ({', '.join(a)}), expected ({', '.join(b)})"
    return None


def _natural(path: str) -> list:
    """model.layers.10 after model.layers.9."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


class _State:
    """Kept on the patched model: the original class of every instance it swapped."""

    def __init__(self, swapped: list[tuple[str, Any, type]], result: PatchResult):
        self.swapped = swapped
        self.result = result


# ---------------------------------------------------------------- API


def patch(
    model,
    patterns: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    preset: Preset | None = None,
    config: PatchConfig | None = None,
) -> PatchResult:
    """Patch `model` in place with the family's preset (or `patterns`, less `exclude`).

    `patterns` and `exclude` follow `zmlx.config.parse_selection`: None (the preset;
    nothing excluded), "none" or () (no patterns), "a,b", "a" or ["a", "b"]. `preset`
    (else ZMLX_PRESET): "default" (exact patterns: identical tokens) or "fast" (also the
    close patterns the ledger shows ACCURATE on this family and backend); explicit
    patterns win over it. Returns the PatchResult, also kept as `model.zmlx_patch_result`.
    Patching an already patched model first restores it, so patching twice equals
    patching once. Raises ConfigError for unknown pattern or preset names and an empty
    selection ("" or ",").
    """
    if not hasattr(model, "named_modules"):
        raise TypeError(f"zmlx.patch expects an mlx-lm model (mlx.nn.Module), got {type(model).__name__}")
    patterns, exclude = parse_selection(patterns, "patterns"), parse_selection(exclude, "exclude")
    config = config if config is not None else PatchConfig.from_env()
    warn_unknown_variables(config)
    family = family_of(model)
    backend = _backend.current()
    if backend == "cuda":  # ZMLX_KERNEL_SOURCES: the CUDA kernels' sources, for MLX's PTX cache
        ptx_cache.start_recording(kernel_sources_dir())
    selected, not_selected = select_patterns(family, patterns, exclude, config, backend, preset)
    unpatch(model)
    fam = FAMILIES.get(family) if family is not None else None
    explicit = patterns is not None or config.patterns is not None
    chosen_by = None if explicit else resolve_preset(preset, config)
    result = PatchResult(family=family, backend=backend, not_selected=not_selected, preset=chosen_by)
    result.preset_note = preset_note(fam, chosen_by, backend) if chosen_by else ""
    if fam is None:
        supported = ", ".join(sorted(FAMILIES))
        why = f": {UNSUPPORTED[family]}" if family in UNSUPPORTED else ""
        result.message = (
            f"nothing to patch: model_type {family!r} has no zmlx patterns{why} "
            f"(supported: {supported}); the model is unchanged"
        )
        result.not_selected = {}
        warnings.warn(result.message, ZmlxWarning, stacklevel=2)
        return result

    # Plan every instance's replacements first, then swap: a failure leaves nothing half done.
    plans: dict[int, tuple[str, Any, dict[str, Any], dict[str, str]]] = {}
    for name in selected:
        pattern = PATTERNS[name]
        target = fam.targets.get(name)
        kplans = [k.plan(result.backend) for k in pattern.kernels]
        path: Literal["kernel", "reference", "mlx"] = (
            "mlx"  # no custom kernel: the pattern is MLX ops (a cache, a compiled step)
            if not kplans
            else "kernel"
            if all(p.path == "kernel" for p in kplans)
            else "reference"
        )
        exact_here = pattern.fidelity_on(result.backend) == "exact"
        report = PatternReport(
            name=name,
            fidelity="exact" if exact_here else pattern.fidelity,
            backend=result.backend,
            path=path,
            fallbacks=sorted({p.reason for p in kplans if p.reason}),
        )
        result.patterns[name] = report
        if target is None:
            report.skipped.append(("*", fam.skips.get(name, f"no target in family {family}")))
            continue
        winners = [w for w in pattern.yields_to if w in result.patterns and result.patterns[w].patched]
        if winners:
            report.skipped.append(("*", f"{winners[0]} is applied and this pattern would bypass it"))
            continue
        cls = fam.target_class(name)
        params = dict(target.params)
        kwargs = {**params, **{opt: getattr(config, opt) for opt in pattern.options}, **dict(pattern.part)}
        fn = _replacement(name, kwargs)
        added = {m: _replacement(name, {**kwargs, "method": m}) for m in pattern.adds}
        bad_sig = _signature_mismatch(cls, pattern.method, fn)
        for mpath, module in model.named_modules():
            if not isinstance(module, cls):
                continue
            mpath = mpath or "<model>"
            reason = bad_sig or pattern.check(module, params)
            entry = plans.setdefault(id(module), (mpath, module, {}, {}))
            if reason is None and pattern.method in entry[2]:
                reason = _merge(entry[2], entry[3][pattern.method], pattern, kwargs)
            elif reason is None:
                entry[2][pattern.method] = fn
                entry[3][pattern.method] = name
                entry[2].update(added)
            if reason is not None:
                report.skipped.append((mpath, reason))
                continue
            report.patched.append(mpath)

    for report in result.patterns.values():
        report.patched.sort(key=_natural)
        report.skipped.sort(key=lambda e: _natural(e[0]))

    swapped = []
    for mpath, module, methods, _ in plans.values():
        if not methods:
            continue
        original: type = type(module)
        module.__class__ = _patched_class(original, tuple(sorted(methods.items())))
        swapped.append((mpath, module, original))
    if not swapped:
        result.message = "nothing patched: no module matched the selected patterns"
        return result
    setattr(model, _STATE, _State(swapped, result))
    setattr(model, RESULT_ATTR, result)
    _distributed.guard(model)  # patches are planned for these shapes: shard() now raises
    return result


def unpatch(model):
    """Restore every instance `patch` swapped to its original class; returns the model."""
    state = getattr(model, _STATE, None) if hasattr(model, "__dict__") else None
    if state is None:
        return model
    for _, module, original in state.swapped:
        module.__class__ = original
    forget(m for _, m in model.named_modules())  # what the patterns prepared holds its weights
    object.__delattr__(model, _STATE)
    object.__delattr__(model, RESULT_ATTR)
    _distributed.release(model)
    return model


def patch_result(model) -> PatchResult | None:
    """The PatchResult of the patch in force on `model`, or None when it is not patched."""
    return getattr(model, RESULT_ATTR, None) if hasattr(model, "__dict__") else None


def is_patched(model) -> bool:
    return patch_result(model) is not None
