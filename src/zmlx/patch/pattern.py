"""The Pattern: what a pattern is, as data plus two small functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from zmlx.kernels.core import Fidelity, KernelDef

__all__ = ["Fidelity", "Pattern"]


@dataclass(frozen=True)
class Pattern:
    name: str
    summary: str  # what it fuses, one line (the README's pattern table)
    fidelity: Fidelity
    kernels: tuple[KernelDef, ...]
    # check(module, params) -> None when the pattern applies to this instance, else
    # the reason it is skipped.
    check: Callable[[Any, Mapping[str, Any]], str | None]
    # make(**params) -> the function installed as `method` on patched instances. It
    # must return the same function object for the same params (the patched classes
    # are cached on it), so pattern files wrap it in functools.cache.
    make: Callable[..., Callable]
    method: str = "__call__"
    # methods the pattern also installs, which the stock class need not have (compiled_decode
    # adds make_cache): make(method=name, **params) gives each
    adds: tuple[str, ...] = ()
    # for a pattern without kernels: the backends where it is bitwise stock (elsewhere it
    # has `fidelity`); a pattern with kernels takes its kernels' fidelity
    exact_on: tuple[str, ...] = ()
    # PatchConfig options passed to make() as keyword arguments (e.g. "shared_overlap")
    options: tuple[str, ...] = ()
    paths: tuple[str, ...] = ("decode", "prefill")
    # patterns that win over this one when they patch any module of the model: this one
    # would bypass what they patched (registered after them, so they are planned first)
    yields_to: tuple[str, ...] = ()
    # the part of a shared method this pattern supplies, as keyword arguments of make() (the
    # decoder layer's attention or MoE half: zmlx.patch.layer). Where two patterns with parts
    # replace the same method of one instance, it gets the one function make() builds from
    # both patterns' arguments and both count it patched; otherwise the first planned wins.
    part: tuple[tuple[str, Any], ...] = ()

    def fidelity_on(self, backend: str) -> Fidelity:
        """The pattern's fidelity on `backend`: exact where every kernel is exact there (a
        pattern without kernels: where `exact_on` names it), else `fidelity`."""
        if self.kernels:
            exact = all(k.fidelity_on(backend) == "exact" for k in self.kernels)  # type: ignore[arg-type]
        else:
            exact = backend in self.exact_on
        return "exact" if exact else self.fidelity
