"""The one convention for naming a group: every function's group parameter is called ``group``.

Where a function already had another name for it (the seed's ``reduce_loss(dp_group=...)``,
``get_sync_ctx(accelerator=...)``), that name stays as an alias so that existing calls keep
working; :func:`group_or_alias` is the one place that reconciles the two spellings.
"""

from __future__ import annotations

from typing import Any


def group_or_alias(group: Any, alias: Any, *, alias_name: str, function: str) -> Any:
    """The group a caller asked for, whichever of the two spellings it used.

    Args:
        group: the value passed as ``group=`` (None when not passed).
        alias: the value passed under the alias (None when not passed).
        alias_name: the alias's parameter name, for the error message.
        function: the public function's name, for the error message.

    Returns:
        ``alias`` when only it was given, else ``group`` (None: the default group).

    Raises:
        TypeError: both spellings were given: an ambiguity the caller must resolve, even when
            both name the same object.
    """
    if alias is None:
        return group
    if group is not None:
        raise TypeError(
            f"{function}() got both group= and {alias_name}=, two names for the same parameter: "
            "pass one of them"
        )
    return alias
