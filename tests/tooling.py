"""External programs the tests drive: haproxy, dotlockfile, curl, openssl, systemd-analyze, the POP3 clients.

A test that needs one must never pass because the program is absent. On a developer's machine it is
skipped with a reason (and a warning in the run's summary) that names what was NOT tested and the Debian
package that brings it; under CI (`CI` set, as `.ci/run` does after installing those packages) a missing
program is a failure, so an install step that silently broke shows up red.

Skips about the platform or the user (no OFD locks, root ignoring permissions) are not tool skips and
stay plain `pytest.skip`.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

#: where daemons live on Debian; a non-root PATH often lacks them (haproxy is /usr/sbin/haproxy)
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class ToolMissing(UserWarning):
    """A test that needs an external program did not run here."""


def which(name: str) -> str | None:
    """Path of program `name`, looking in the sbin directories too; None when it is not installed."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def under_ci() -> bool:
    """True when the run must not skip for a missing program (CI exports CI=1)."""
    return bool(os.environ.get("CI"))


def _reason(name: str, package: str) -> str:
    return f"{name} NOT INSTALLED (apt-get install -y {package}): the test that needs it was NOT run"


def require_tool(name: str, package: str) -> str:
    """Path of program `name`; missing: fail under CI, else skip loudly. Call it inside a test or fixture."""
    path = which(name)
    if path is not None:
        return path
    reason = _reason(name, package)
    if under_ci():
        pytest.fail(f"{reason}; CI must install {package}", pytrace=False)
    warnings.warn(reason, ToolMissing, stacklevel=2)
    pytest.skip(reason)


def needs_tool(name: str, package: str) -> Callable[[F], F]:
    """Decorator for a test that runs program `name`: the test as is where it is installed, otherwise a
    test that fails under CI and skips loudly elsewhere (see `require_tool`)."""

    def decorate(test: F) -> F:
        if which(name) is not None:
            return test
        if not under_ci():
            warnings.warn(_reason(name, package), ToolMissing, stacklevel=2)
            return pytest.mark.skip(reason=_reason(name, package))(test)  # type: ignore[no-any-return]
        # keep the test's signature (fixtures, parametrize marks) and its sync/async kind
        if inspect.iscoroutinefunction(test):

            @functools.wraps(test)
            async def missing_async(*_args: Any, **_kwargs: Any) -> None:
                require_tool(name, package)

            return missing_async  # type: ignore[return-value]

        @functools.wraps(test)
        def missing(*_args: Any, **_kwargs: Any) -> None:
            require_tool(name, package)

        return missing  # type: ignore[return-value]

    return decorate
