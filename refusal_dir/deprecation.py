"""Old keyword names that keep working for one release (docs/glossary.md, "Old names").

Two forms of one rule (a :class:`DeprecationWarning` naming the new keyword; both the old and the
new name given is a one-line :class:`ConfigError`):

* ``@renamed_keywords(direction_layer="layer")`` on a function with fixed parameters;
* :func:`renamed` inside a function that takes ``**deprecated`` (when an old form needs more than
  a rename, as a list passed as ``addition(layer=...)``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from refusal_dir.errors import ConfigError

Function = TypeVar("Function", bound=Callable[..., Any])


def _rename(function: str, old: str, new: str, *, taken: bool, stacklevel: int) -> None:
    warnings.warn(
        f"{function}({old}=) is deprecated: use {new}= (docs/glossary.md)", DeprecationWarning, stacklevel=stacklevel + 1
    )
    if taken:
        raise ConfigError(f"{function}() got both {old}= and {new}=: use {new}= only")


def renamed(
    old: Mapping[str, Any], function: str, names: Mapping[str, str], given: Mapping[str, Any]
) -> dict[str, Any]:
    """``given`` (the new keywords as passed; None: not passed) with the deprecated keywords in
    ``old`` moved onto their new names (``names``: old -> new)."""
    out = dict(given)
    for name, value in old.items():
        if name not in names:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
        new = names[name]
        _rename(function, name, new, taken=out.get(new) is not None, stacklevel=3)
        out[new] = value
    return out


def renamed_keywords(**renames: str) -> Callable[[Function], Function]:
    """Map each old keyword onto its new name (``old="new"``) before calling the function."""

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    _rename(function.__name__, old, new, taken=new in kwargs, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
