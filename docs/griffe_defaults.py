"""Griffe extension for the API reference: show a parameter's default value, not the constant.

``WorkerPool(max_pending=DEFAULT_MAX_PENDING)`` in the source renders as
``max_pending: int = 100000``: a reader wants the number, and the constant is private.
Only names of module-level constants with a literal value are replaced.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class ConstantDefaults(griffe.Extension):
    """Replace defaults that name a module constant with the constant's literal value."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.is_function:
                self._replace_defaults(member)
            elif member.is_module or member.is_class:
                self._visit(member)

    def _replace_defaults(self, func: griffe.Function) -> None:
        for parameter in func.parameters:
            default = parameter.default
            if not isinstance(default, griffe.ExprName):
                continue
            constant = func.module.members.get(default.name)
            if constant is None or constant.is_alias or not constant.is_attribute or constant.value is None:
                continue
            value = str(constant.value)
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):
                continue
            parameter.default = value
